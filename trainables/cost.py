"""What one member costs, counted from its config: the log steps, not the iterations, dominate.

At every log step a network member computes the full-batch gradient, the test metrics and M =
``num_stoch_grads`` stochastic gradients (docs/theory.md §3), and entropy where its estimator's plan
evaluates; between log steps it takes one minibatch step per iteration. The toys draw no stochastic
gradients at log steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainables.member import NETWORKS
from trainables.schedule import SnapshotPlan, log_iterations


@dataclass(frozen=True)
class RunCost:
    iterations: int                    # SGD steps
    log_steps: int                     # full measurements
    stochastic_gradients: int          # log steps × M (networks); 0 for the toys
    entropy_evaluations: dict          # estimator name → windows evaluated
    snapshots: int                     # weight vectors kept for the entropy windows

    def describe(self) -> str:
        ent = ", ".join(f"{n} {k}" for n, k in self.entropy_evaluations.items()) or "none"
        return (f"cost: {self.iterations:,} SGD steps; {self.log_steps:,} log steps, each a full-batch "
                f"gradient + test evaluation; {self.stochastic_gradients:,} stochastic gradients at log steps "
                f"(log steps × M); entropy evaluations: {ent}; {self.snapshots:,} snapshots kept")


def run_cost(cfg: dict) -> RunCost:
    """The counts for one full member config (ValueError on a bad log schedule)."""
    log = log_iterations(cfg["log_schedule"], int(cfg["iterations"]))
    plan = SnapshotPlan(log, cfg.get("entropy") or [])
    m = int(cfg["num_stoch_grads"]) if cfg["model"] in NETWORKS else 0
    return RunCost(iterations=int(cfg["iterations"]), log_steps=len(log), stochastic_gradients=len(log) * m,
                   entropy_evaluations={s["name"]: len(steps) for s, steps in zip(plan.specs, plan.eval_steps)},
                   snapshots=len(plan.snapshot_iters))
