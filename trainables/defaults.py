"""Device choice (member defaults live in trainables.member)."""
from __future__ import annotations


def resolve_device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
