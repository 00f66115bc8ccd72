"""Tests for the single-trial CLI ``python -m trainables.cli`` (old name ``trainables.run``, trainables/cli.py)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BASE_NAMES, repo_env
from trainables.cli import main

SMALL = ["--model", "convnet", "--width", "2", "--dataset", "digits", "--lr", "0.01",
         "--batch-size", "32", "--num-stoch-grads", "2", "--entropy", "knn:6", "--ks", "1,2,5,1000",
         "--device", "cpu", "--no-progress"]


def cli(argv, capsys):
    """Run main(argv); return (exit status, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_short_run_writes_all_files_as_a_subprocess(tmp_path):
    out = tmp_path / "run"
    env = dict(repo_env(), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "trainables.run", *SMALL, "--iters", "40",
                           "--log-schedule", "every:10", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the cost is announced before training: log steps 10, 20, 30, 40; M = 2 each; the knn window of 6
    # consecutive iterations is complete at all four
    cost = proc.stdout.splitlines()[0]
    assert cost.startswith("cost: 40 SGD steps; 4 log steps") and "8 stochastic gradients" in cost
    assert "entropy evaluations: knn 4" in cost
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [10, 20, 30, 40]
    assert set(rows[0]) == BASE_NAMES | {"entropy_knn_k1", "entropy_knn_k2", "entropy_knn_k5", "window_radius",
                                        "window_radius_knn"}
    assert all(set(r) == set(rows[0]) for r in rows)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 0.01 and cfg["width"] == 2 and cfg["iterations"] == 40
    assert cfg["entropy"] == [{"name": "knn", "window": 6, "stride": 1, "ks": [1, 2, 5, 1000],
                               "evaluate_last": None, "evaluate_every": None}]   # the grid's spec form
    assert cfg["running_every"] == 50  # defaults filled in

    status = json.loads((out / "status.json").read_text())
    assert status == {"status": "done", "iteration": 40, "D": 1530}

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"config", "runner", "sink"}
    assert ckpt["runner"]["iteration"] == 40 and ckpt["runner"]["status"] == ["done"]
    assert ckpt["config"] == cfg
    assert (out / "running.jsonl").exists()


def test_stop_and_resume_reproduce_the_uninterrupted_run(tmp_path, capsys):
    args = [*SMALL, "--iters", "120", "--log-schedule", "every:15"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli([*args, "--out", str(a)], capsys)[0] == 0
    assert cli([*args, "--out", str(b), "--stop-after", "50"], capsys)[0] == 0
    assert json.loads((b / "status.json").read_text())["status"] == "stopped"
    assert [r["iteration"] for r in read_jsonl(b / "metrics.jsonl")] == [15, 30, 45, 60]
    assert cli([*args, "--out", str(b), "--resume"], capsys)[0] == 0
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()
    assert (b / "running.jsonl").read_text() == (a / "running.jsonl").read_text()
    assert [r["iteration"] for r in read_jsonl(a / "running.jsonl")] == [50, 100]
    assert json.loads((b / "status.json").read_text()) == json.loads((a / "status.json").read_text())
    ta = torch.load(a / "checkpoint.pt", weights_only=True)["runner"]["model"]
    tb = torch.load(b / "checkpoint.pt", weights_only=True)["runner"]["model"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

    # resuming with other arguments is refused and names the difference
    code, err = cli([*[x if x != "0.01" else "0.02" for x in args], "--out", str(b), "--resume"], capsys)
    assert code == 2 and "lr" in err


@pytest.mark.parametrize("change,expected", [
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--model", "vgg"], "--model"),
    (["--protocol", "adam"], "--protocol"),
    (["--entropy", "knn"], "entropy spec"),
    (["--entropy", "gauss:100"], "entropy spec"),
    (["--entropy", "knn:1"], "WINDOW"),
    (["--entropy", "kl:10:x"], "STRIDE"),
    (["--log-schedule", "weekly"], "--log-schedule"),
    (["--log-schedule", "every:0"], "--log-schedule"),
    (["--wd", "-0.1"], "--wd"),
    (["--ks", "0,5"], "--ks"),
    (["--iters", "0"], "--iters"),
])
def test_bad_arguments_exit_2_naming_the_problem(tmp_path, capsys, change, expected):
    argv = [*SMALL, "--iters", "20", "--out", str(tmp_path / "x")]
    # replace the option if it is already present, else append it
    if change[0] in argv:
        i = argv.index(change[0])
        argv[i + 1] = change[1]
    else:
        argv += change
    code, err = cli(argv, capsys)
    assert code == 2
    assert expected in err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_resume_without_checkpoint(tmp_path, capsys):
    code, err = cli([*SMALL, "--iters", "20", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err


def test_reusing_an_output_directory_needs_resume(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*SMALL, "--iters", "10", "--log-schedule", "every:10", "--out", str(out)]
    assert cli(args, capsys)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, err = cli(args, capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == before   # nothing overwritten


def test_divergence_exits_1_with_rows_so_far(tmp_path, capsys):
    out = tmp_path / "d"
    # lr 1e3 with fixed ELR diverges after a few steps (at iteration 6 here), after some logged rows
    code, err = cli([*SMALL, "--protocol", "fixed_elr", "--lr", "1e3", "--iters", "200",
                     "--log-schedule", "every:2", "--out", str(out)], capsys)
    assert code == 1 and "diverged" in err and "smaller --lr" in err
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged" and 2 < status["iteration"] < 200
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(2, status["iteration"], 2))      # nothing lost
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    torch.load(out / "checkpoint.pt", weights_only=True)


def test_resume_accepts_a_run_saved_before_the_entropy_spec_was_completed(tmp_path, capsys):
    # runs written by the old CLI stored {name, window, stride, ks} only; resuming them must still work
    args = [*SMALL, "--iters", "30", "--log-schedule", "every:15", "--out", str(tmp_path / "o")]
    assert cli([*args, "--stop-after", "15"], capsys)[0] == 0
    path = tmp_path / "o" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["entropy"] = [{k: v for k, v in s.items() if not k.startswith("evaluate_")} for s in cfg["entropy"]]
    path.write_text(json.dumps(cfg))
    assert cli([*args, "--resume"], capsys)[0] == 0
    assert [r["iteration"] for r in read_jsonl(tmp_path / "o" / "metrics.jsonl")] == [15, 30]


def test_help_lists_every_schema_key_with_its_meaning(capsys):
    from trainables import member
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in member.COMMON:
        if key.name != "entropy":
            flag = "--iters" if key.name == "iterations" else "--" + key.name.replace("_", "-")
            assert flag in text and " ".join(key.meaning.split()) in text, key.name
