"""Helpers shared by the benchmark scripts: the side-by-side studies' settings, machine
description, table printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "out"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Setting:
    """One dataset's side-by-side study (side_by_side, round_profile, step_time): the study, its
    split, the held-out site, the U-Net (one residual unit per level), patch, batch, SGD rate and
    the side-by-side's local epochs."""

    study: Path
    split: int
    heldout: str
    channels: tuple[int, ...]
    patch: int
    local_epochs: int
    batch: int = 8
    lr: float = 0.05


SETTINGS = {
    "monuseg": Setting(SHARED_DATA / "monuseg", 0, "heldout", (16, 32, 64, 128), 256, 120),
    "hippocampus": Setting(SHARED_DATA / "hippocampus", 4, "site-msd#3", (16, 32, 64), 32, 10),
}


def machine() -> str:
    """One line naming the machine the figures came from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    """Print rows as a table and write them (plus ``extra``) to ``benchmarks/out/<name>.json``."""
    cols = list(dict.fromkeys(k for r in rows for k in r))  # rows may lack a column
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    for key, value in extra.items():
        print(f"{key}: {_fmt(value)}")
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"rows": rows, **extra, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
