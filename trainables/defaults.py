"""Device choice, and the member defaults re-exported under their old names (their home: trainables.member)."""
from __future__ import annotations

from trainables.member import DEFAULT_KS, MEMBER_DEFAULTS, member_config as fill_defaults  # noqa: F401 (re-exported)


def resolve_device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
