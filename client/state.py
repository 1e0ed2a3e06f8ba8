"""Site state folder: local layers per federation run, written atomically, never sent.

``state-dir/runs/<run>/local_layers-<round>.pt`` holds a run's site-local tensors after a round,
tagged with the model signature they belong to; the last two rounds are kept, so a round the
coordinator runs again after a crash starts from the same local layers as the first time.
``state-dir/privacy_ledger.json`` (``privacy.py``) is site-wide, because epsilon belongs to the
site across every run; so is ``state-dir/rounds_trained.json``, when the site trained in the last
24 hours (its ``max-rounds-per-day`` counts every run).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedseg.common.atomic import atomic_torch_save, atomic_write_json, private_dir

RUNS_DIR = "runs"
LOCAL_LAYERS = re.compile(r"local_layers-(\d+)\.pt$")
TRAINED_FILE = "rounds_trained.json"
DAY_SECONDS = 24 * 3600


def run_key(run_name: str, run_id: str) -> str:
    """Folder name of a run at a site: its name (made path-safe) and the start of its id, so two
    federations that chose the same run name never share local layers."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("._") or "run"
    return f"{safe}-{run_id[:8]}" if run_id else safe


@dataclass(frozen=True)
class StoredRun:
    """One run's state at a site, as ``fedseg state`` lists it."""

    key: str
    run_name: str
    run_id: str
    round: int
    signature: str
    modified: str
    bytes: int


class RunState:
    """A run's folder inside the site's state dir.

    Args:
        path: ``state-dir/runs/<run>``.
        run_name, run_id: the federation run it belongs to.
    """

    def __init__(self, path: Path, run_name: str, run_id: str) -> None:
        self.path, self.run_name, self.run_id = path, run_name, run_id

    def saved_rounds(self) -> list[int]:
        """Rounds whose local layers are kept, oldest first."""
        return sorted(int(m.group(1)) for p in self.path.glob("local_layers-*.pt")
                      if (m := LOCAL_LAYERS.search(p.name)))

    def local_layers_path(self, up_to_round: int | None = None) -> Path | None:
        """The file of the newest kept round <= ``up_to_round`` (None: the newest of all)."""
        rounds = [r for r in self.saved_rounds() if up_to_round is None or r <= up_to_round]
        return self.path / f"local_layers-{rounds[-1]}.pt" if rounds else None

    def load_local_layers(self, signature: str, up_to_round: int | None = None) -> dict[str, torch.Tensor] | None:
        """The site-local tensors this run saved by round ``up_to_round`` (None: its last round),
        or None before its first.

        Raises:
            RuntimeError: the file is unreadable, or belongs to another model (named in the message).
        """
        path = self.local_layers_path(up_to_round)
        saved = _read(path) if path is not None else None
        if saved is None:
            return None
        if saved.get("signature") != signature:
            raise RuntimeError(
                f"{path}: local layers of another model (signature {saved.get('signature')}, this "
                f"run needs {signature}); remove them with `fedseg state {self.path.parent.parent} "
                f"--delete {self.path.name}`")
        return saved["tensors"]

    def save_local_layers(self, tensors: dict[str, torch.Tensor], server_round: int,
                          signature: str) -> None:
        """Atomically write the site-local tensors of a round (tagged with the model signature);
        keep this round's and the one before, so either can start a round run again."""
        private_dir(self.path.parent.parent)
        atomic_torch_save(self.path / f"local_layers-{server_round}.pt", {
            "round": server_round, "signature": signature, "run_name": self.run_name,
            "run_id": self.run_id, "tensors": {k: v.detach().cpu() for k, v in tensors.items()}})
        for old in self.saved_rounds():
            if old < server_round - 1:
                (self.path / f"local_layers-{old}.pt").unlink(missing_ok=True)


class SiteState:
    """The site's own state folder (node config ``state-dir``); nothing here is ever sent.

    Args:
        state_dir: folder, created on first write.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)

    def run(self, run_name: str, run_id: str) -> RunState:
        """The state of one federation run."""
        return RunState(self.dir / RUNS_DIR / run_key(run_name, run_id), run_name, run_id)

    def runs(self) -> list[StoredRun]:
        """Every run this site holds local layers for, oldest first."""
        found = []
        for folder in sorted(p for p in (self.dir / RUNS_DIR).glob("*") if p.is_dir()):
            path = RunState(folder, "", "").local_layers_path()
            if path is None:
                continue
            try:
                saved = _read(path) or {}
            except RuntimeError:
                saved = {"run_name": "(unreadable)"}
            stat = path.stat()
            found.append(StoredRun(folder.name, str(saved.get("run_name", "")),
                                   str(saved.get("run_id", "")), int(saved.get("round", 0)),
                                   str(saved.get("signature", "")),
                                   time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime)),
                                   sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())))
        return sorted(found, key=lambda r: r.modified)

    def rounds_trained_today(self, now: float | None = None) -> int:
        """Training rounds this site took in the 24 hours before ``now`` (default: the clock)."""
        return len(self._trained_since(time.time() if now is None else now))

    def note_round_trained(self, now: float | None = None) -> None:
        """Record a finished training round (atomically; only the last 24 hours are kept)."""
        now = time.time() if now is None else now
        private_dir(self.dir)
        atomic_write_json(self.dir / TRAINED_FILE, self._trained_since(now) + [now])

    def _trained_since(self, now: float) -> list[float]:
        """When the site trained in the 24 hours before ``now``."""
        path = self.dir / TRAINED_FILE
        if not path.is_file():
            return []
        try:
            times = [float(t) for t in json.loads(path.read_text())]
        except (ValueError, TypeError) as err:  # a damaged file must not lift the limit
            raise RuntimeError(f"{path}: unreadable ({err}); refusing to train until it is restored "
                               "or removed by the site") from err
        return [t for t in times if now - DAY_SECONDS < t <= now]

    def delete_run(self, key: str) -> Path:
        """Remove one run's folder (its local layers); the privacy ledger is never touched.

        Raises:
            ValueError: no such run at this site.
        """
        path = self.dir / RUNS_DIR / key
        if "/" in key or key in ("", ".", "..") or not path.is_dir():
            raise ValueError(f"{self.dir}: no stored run {key!r} (see `fedseg state {self.dir}`)")
        shutil.rmtree(path)
        return path


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any load failure means a damaged file
        raise RuntimeError(f"{path}: cannot read the site's local layers ({err})") from err
