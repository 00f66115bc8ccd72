"""The stopping rule (trainables.stopping) on series with known statistics, and the vMF bundle that
lets stopped members leave its batch."""
import math

import numpy as np
import pytest
import torch

from trainables.sinks import LocalSink
from trainables.stopping import StopRule, check_spec, drift_z, mean_se
from trainables.toys.vmf import VMFRunner


def test_mean_se_and_drift_by_hand():
    # values 1, 2, 3, 4: mean 2.5, sample variance 5/3, s.e. sqrt(5/12)
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 12), rel=1e-15)
    # windows [1, 3] and [2, 4]: means 2 and 3, s.e. 1 each: z = 1/√2
    assert drift_z([1.0, 3.0, 2.0, 4.0], 2) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert drift_z([1.0, 3.0, 2.0], 2) is None                  # fewer than two windows


def _feed(rule, i, U, S, every_s, t0=0):
    for k, u in enumerate(U):
        row = {"train_loss": u, "radius": 1.0 + 1e-4 * math.sin(k)}
        if k % every_s == every_s - 1:
            row["entropy_kl_sphere"] = S[k // every_s]
        rule.observe(i, row)


def test_stationary_precise_member_stops_and_drifting_or_held_ones_do_not():
    rng = np.random.default_rng(0)
    spec = {"u_rel_se": 0.01, "s_se": 0.05, "u_rows": 25, "s_evals": 10}
    rule = StopRule(spec, 4)
    n = 80                                                     # 80 rows, an entropy value every 4th
    U = 0.1 * (1 + 0.02 * rng.standard_normal(n))              # rel. s.e. of 25 rows ≈ 0.02/5 = 0.004
    S = 1.0 + 0.05 * rng.standard_normal(n // 4)               # s.e. of 10 values ≈ 0.016
    _feed(rule, 0, U, S, 4)
    why = rule.verdict(0, 800_000)
    assert why is not None and why["stopped_at"] == 800_000
    assert why["stop_U_rel_se"] == pytest.approx(mean_se(list(U[-25:]))[1] / U[-25:].mean(), rel=1e-12)
    assert why["stop_S_se"] <= 0.05 and why["stop_U_drift_z"] <= 3
    # U still relaxing: the latest window sits 10 s.e. below the one before
    _feed(rule, 1, U * (1 + 2.0 * np.exp(-np.arange(n) / 20)), S, 4)
    assert rule.verdict(1, 800_000) is None
    # noisy U: stationary but its relative s.e. (≈ 0.04) misses the 0.01 target
    _feed(rule, 2, 0.1 * (1 + 0.2 * rng.standard_normal(n)), S, 4)
    assert rule.verdict(2, 800_000) is None
    # the OP convergence regime is never stopped early
    _feed(rule, 3, U, S, 4)
    rule.hold(3)
    assert rule.verdict(3, 800_000) is None
    # too few entropy values for two windows: keep running
    short = StopRule(spec, 1)
    _feed(short, 0, U[:60], S, 4)                              # 15 entropy values < 2 × 10
    assert short.verdict(0, 600_000) is None


def test_spec_is_checked():
    assert check_spec(None) is None
    assert check_spec({"s_se": "0.05"})["s_se"] == 0.05
    for bad, msg in (({"u_rel": 1}, "unknown key"), ({"u_rel_se": -1}, "> 0"), ({"drift_z": 2}, "at least one"),
                     ({"u_rel_se": 0.1, "u_rows": 1}, "u_rows")):
        with pytest.raises(ValueError, match=msg):
            check_spec(bad)


SPEC = {"name": "kl", "window": 20, "stride": 50, "standardize": True, "evaluate_every": 2000}


def _bundle(stop_when, iterations=60_000):
    # a fast walker (η_eff = 0.1: relaxes in ~10 steps) and a slow one (η_eff = 1e-4: ~10⁴ steps)
    return [dict(protocol="fixed_sphere", lr=lr, iterations=iterations, log_schedule="every:1000",
                 entropy=[SPEC], stop_when=stop_when) for lr in (0.1, 1e-4)]


def test_vmf_member_stops_leaves_the_batch_and_resumes_exactly():
    stop = {"u_rel_se": 0.1, "s_se": 0.3, "u_rows": 10, "s_evals": 5}
    runner = VMFRunner(_bundle(stop))
    events = list(runner.run(LocalSink([SPEC], 2, 3, dtype=torch.float64)))
    assert runner.status == ["stopped", "done"]
    stop_rows = [(e["iteration"], e["rows"][0]) for e in events if e["rows"][0] and "stopped_at" in e["rows"][0]]
    ((t_stop, row),) = stop_rows
    assert row["stopped_at"] == t_stop and t_stop < 60_000
    assert all(e["rows"][0] is None for e in events if e["iteration"] > t_stop)
    assert events[-1]["rows"][1] is not None and events[-1]["iteration"] == 60_000
    # the stopped walker left the batch: its θ is frozen from the stop on while the other moves
    frozen = runner.theta[0].clone()
    # a resume from a state saved after the stop reproduces the uninterrupted run
    first = VMFRunner(_bundle(stop))
    sink = LocalSink([SPEC], 2, 3, dtype=torch.float64)
    it = first.run(sink)
    head = [next(it) for _ in range(t_stop // 1000 + 5)]
    state = {"runner": first.state_dict(), "sink": sink.state_dict()}
    second = VMFRunner(_bundle(stop))
    second.load_state_dict(state["runner"])
    sink2 = LocalSink([SPEC], 2, 3, dtype=torch.float64)
    sink2.load_state_dict(state["sink"])
    assert head + list(second.run(sink2)) == events
    torch.testing.assert_close(second.theta[0], frozen, rtol=0, atol=0)
    # without stop_when every member runs to the end
    plain = VMFRunner(_bundle(None))
    list(plain.run(LocalSink([SPEC], 2, 3, dtype=torch.float64)))
    assert plain.status == ["done", "done"]
