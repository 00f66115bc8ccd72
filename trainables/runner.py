"""Pick the runner for a bundle of members by model (docs/DESIGN.md, "Runners")."""
from __future__ import annotations

NETWORK_MODELS = ("convnet", "resnet18")
TOY_MODELS = ("vmf", "sphere_toy")


def make_runner(members: list[dict], device=None):
    models = {m.get("model", "convnet") for m in members}
    if len(models) != 1:
        raise ValueError(f"a bundle must share one model, got {sorted(models)}")
    model = models.pop()
    if model in NETWORK_MODELS:
        from trainables.trial import NetworkRunner
        return NetworkRunner(members, device)
    if model == "vmf":
        from trainables.toys.vmf import VMFRunner
        return VMFRunner(members, device)
    if model == "sphere_toy":
        from trainables.toys.sphere import SphereToyRunner
        return SphereToyRunner(members, device)
    raise ValueError(f"unknown model '{model}'; choose one of {', '.join(NETWORK_MODELS + TOY_MODELS)}")
