"""Which torch device a site or a command computes on: ``auto`` takes CUDA where there is one."""

from __future__ import annotations

import re

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(requested: str, source: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; ``cuda[:N]`` is checked.

    Args:
        requested: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        source: where the setting came from, for the error (e.g. "run-config 'device'").

    Raises:
        ValueError: CUDA asked for on a machine without it (or without device N).
    """
    import torch

    if not DEVICE.fullmatch(requested):
        raise ValueError(f"{source} = {requested!r}: must be auto, cpu, cuda or cuda:N")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"{source} = {requested!r} but this machine has {found} CUDA device(s); "
                             "use device='cpu' or 'auto'")
    return requested
