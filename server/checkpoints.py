"""Save and resume the global model: checkpoints/round-N.pt every round, model/global.pt at the end.

Each file holds the shared weights and what rebuilds the model at a site: the model spec, the
local-layer mode and keys, the patch size, the flip axes, the grid the network sees (``spacing``),
and the run's name and id (a site finds its own local
layers of that run by them).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedseg.common.atomic import atomic_torch_save

log = logging.getLogger(__name__)

_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")
META_KEYS = ("model", "local_layers", "local_keys", "patch_size", "flip_axes", "spacing", "run_name", "run_id")


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, meta: dict[str, Any],
                    average: ArrayRecord | None = None, server_state: dict[str, Any] | None = None,
                    pending_record: dict[str, Any] | None = None) -> Path:
    """Atomically write ``checkpoints/round-N.pt``: the aggregate's shared weights (training
    continues from them), ``meta`` (``META_KEYS``), the server's moving average if it keeps one,
    the strategy's own state (``strategies.server_state``) so a resume continues exactly, and
    what the round recorded so far when its rounds.jsonl line waits for scores still to come."""
    path = run_dir / "checkpoints" / f"round-{server_round}.pt"
    payload = _payload(server_round, arrays, meta)
    if average is not None:
        payload["average_state_dict"] = average.to_torch_state_dict()
    if server_state is not None:
        payload["server_state"] = server_state
    if pending_record is not None:
        payload["pending_record"] = pending_record
    atomic_torch_save(path, payload)
    return path


def save_global_model(run_dir: Path, server_round: int, arrays: ArrayRecord, meta: dict[str, Any]) -> Path:
    """Atomically write ``model/global.pt`` (what ``fedseg predict`` loads at a site)."""
    path = run_dir / "model" / "global.pt"
    atomic_torch_save(path, _payload(server_round, arrays, meta))
    return path


def latest_checkpoint(run_dir: Path, up_to: int | None = None) -> tuple[int, dict[str, Any]] | None:
    """(round, checkpoint) of the newest readable checkpoint (of round ``up_to`` or before), or
    None if there is none.

    A damaged newest file (e.g. the disk filled up) falls back to the one before it, with a
    warning that names it.
    """
    found = sorted(((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("round-*.pt")
                    if (m := _ROUND_FILE.search(p.name)) and (up_to is None or int(m.group(1)) <= up_to)),
                   reverse=True)
    for server_round, path in found:
        try:
            return server_round, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unreadable checkpoint: try the previous round
            log.warning("%s is damaged (%s); falling back to the previous checkpoint", path, err)
    return None


def _payload(server_round: int, arrays: ArrayRecord, meta: dict[str, Any]) -> dict[str, Any]:
    missing = set(META_KEYS) - set(meta)
    if missing:
        raise ValueError(f"checkpoint meta lacks {sorted(missing)}")
    return {"round": server_round, "state_dict": arrays.to_torch_state_dict(),
            **{k: meta[k] for k in META_KEYS}}
