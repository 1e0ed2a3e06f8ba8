"""The run folder (ARCHITECTURE §7): run.json, rounds.jsonl, summary.json."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from fedseg.common.atomic import atomic_write_bytes, atomic_write_json, json_safe


class RunFolder:
    """Writes one run's outputs; every file is replaced atomically or appended line by line."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)

    @property
    def rounds_path(self) -> Path:
        """rounds.jsonl."""
        return self.dir / "rounds.jsonl"

    def write_run_info(self, info: dict[str, Any]) -> None:
        """run.json: config, versions, sites, seed, start/end time."""
        atomic_write_json(self.dir / "run.json", info)

    def read_run_info(self) -> dict[str, Any]:
        """run.json as written."""
        return json.loads((self.dir / "run.json").read_text())

    def append_round(self, record: dict[str, Any]) -> None:
        """Append one round to rounds.jsonl and fsync it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.rounds_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_rounds(self) -> list[dict[str, Any]]:
        """All complete rounds logged so far (a torn last line from a crash is ignored)."""
        if not self.rounds_path.is_file():
            return []
        rounds = []
        for line in self.rounds_path.read_text().splitlines():
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rounds

    def keep_rounds_up_to(self, last_round: int) -> list[dict[str, Any]]:
        """On resume: drop logged rounds newer than the checkpoint; returns the rounds kept."""
        kept = [r for r in self.read_rounds() if r["round"] <= last_round]
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        atomic_write_bytes(self.rounds_path, text.encode())
        return kept

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json."""
        atomic_write_json(self.dir / "summary.json", summary)


def versions() -> dict[str, str]:
    """Versions of the parts that decide results."""
    import flwr
    import monai
    import opacus
    import torch

    return {"python": platform.python_version(), "flwr": flwr.__version__, "torch": torch.__version__,
            "monai": monai.__version__, "opacus": opacus.__version__}


def now() -> str:
    """UTC timestamp, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
