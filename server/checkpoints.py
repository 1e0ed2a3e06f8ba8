"""Save and resume the global model: checkpoints/round-N.pt every round, model/global.pt at the end."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedseg.common.atomic import atomic_torch_save

_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, model: dict[str, Any],
                    local_keys: list[str], patch_size: int) -> Path:
    """Atomically write ``checkpoints/round-N.pt``: shared weights + what rebuilds the model."""
    path = run_dir / "checkpoints" / f"round-{server_round}.pt"
    atomic_torch_save(path, _payload(server_round, arrays, model, local_keys, patch_size))
    return path


def save_global_model(run_dir: Path, server_round: int, arrays: ArrayRecord, model: dict[str, Any],
                      local_keys: list[str], patch_size: int) -> Path:
    """Atomically write ``model/global.pt`` (what ``fedseg predict`` loads at a site)."""
    path = run_dir / "model" / "global.pt"
    atomic_torch_save(path, _payload(server_round, arrays, model, local_keys, patch_size))
    return path


def latest_checkpoint(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """(round, checkpoint) of the newest readable checkpoint, or None if there is none.

    A damaged newest file (e.g. the disk filled up) falls back to the one before it.
    """
    found = sorted(((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("round-*.pt")
                    if (m := _ROUND_FILE.search(p.name))), reverse=True)
    for server_round, path in found:
        try:
            return server_round, torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable checkpoint: try the previous round
            continue
    return None


def _payload(server_round: int, arrays: ArrayRecord, model: dict[str, Any],
             local_keys: list[str], patch_size: int) -> dict[str, Any]:
    return {"round": server_round, "state_dict": arrays.to_torch_state_dict(), "model": model,
            "local_keys": sorted(local_keys), "patch_size": patch_size}
