"""engine.layout: the param encoding the tracker writes decodes to the values the grid had, and the
module stays importable without Ray or MLflow (the analysis imports it)."""
import subprocess
import sys

from conftest import REPO
from engine import layout


def test_params_come_back_with_their_types():
    cases = [("lr", 0.1, "0.1", 0.1), ("lr", 1, "1", 1.0), ("width", 8, "8", 8), ("D", 1234.0, "1234.0", 1234),
             ("model", "convnet", "convnet", "convnet"), ("entropy", None, "null", None),
             ("entropy", [{"name": "knn", "window": 70}], '[{"name": "knn", "window": 70}]',
              [{"name": "knn", "window": 70}]),
             ("stop_when", {"loss_below": 0.01}, '{"loss_below": 0.01}', {"loss_below": 0.01}),
             ("augment", True, "True", True), ("log_schedule", "every:10", "every:10", "every:10")]
    for key, value, text, decoded in cases:
        assert layout.encode_param(value) == text, key
        back = layout.decode_param(key, text)
        assert back == decoded and type(back) is type(decoded), (key, back)


def test_long_params_are_cut_to_mlflows_limit():
    assert len(layout.encode_param("x" * 7000)) == 6000


def test_search_filter_names_every_tag():
    text = layout.tags_equal({layout.TAG_SWEEP_ID: "demo_1", layout.TAG_ROLE: layout.ROLE_MEMBER})
    assert text == "tags.`thermosweep.sweep_id` = 'demo_1' and tags.`thermosweep.role` = 'member'"


def test_running_metric_names():
    assert layout.running_metric("radius_preproj") == "running/radius_preproj"
    assert layout.is_running_metric("running/radius_preproj") and not layout.is_running_metric("radius")


def test_importing_the_layout_loads_neither_ray_nor_mlflow():
    code = "import sys, engine.layout; print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr
