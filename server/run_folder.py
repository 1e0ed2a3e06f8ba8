"""The run folder (docs/architecture.md, Outputs): run.json, rounds.jsonl, summary.json; opening a new run or
resuming one (the one place that merges a stored run config with a resume request)."""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedseg.common.atomic import atomic_write_bytes, atomic_write_json, json_safe
from fedseg.common.config import ConfigError, RunConfig
from fedseg.server.checkpoints import latest_checkpoint

log = logging.getLogger(__name__)

RESUMABLE = ("num-server-rounds", "round-timeout", "tracking", "mlflow-uri")  # what a resume may change
# keys a run folder written by an earlier fedseg may hold, now settings of their own (the
# simulation's split is run.json's ``split_site``) or no longer settings at all
RETIRED_KEYS = ("split-site", "site-cache-mb", "gpus-per-site", "pack-weights", "evaluate-in-train")


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

    def split_site(self) -> int:
        """Virtual sites the simulation split its study's one site into (0: not split)."""
        info = self.read_run_info()
        return int(info.get("split_site", info["config"].get("split-site", 0)))

    def append_round(self, record: dict[str, Any]) -> None:
        """Append one round to rounds.jsonl and fsync it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.rounds_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_rounds(self) -> list[dict[str, Any]]:
        """All complete rounds logged so far (a torn last line from a crash is ignored)."""
        return self.intact_rounds()[0]

    def intact_rounds(self) -> tuple[list[dict[str, Any]], int | None]:
        """(the rounds logged before any damaged line, the 1-based number of the first damaged
        line or None): a write cut off by a crash or a full disk leaves a torn line."""
        if not self.rounds_path.is_file():
            return [], None
        rounds = []
        for number, line in enumerate(self.rounds_path.read_text().splitlines(), start=1):
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError:
                return rounds, number
        return rounds, None

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


@dataclass
class OpenRun:
    """A run folder ready for rounds.

    Args:
        folder: the run folder.
        cfg: the run's config (for a resume: the stored one, with ``RESUMABLE`` keys updated).
        run_id: unique id, fixed at the run's start (sites key their local layers by it).
        done: rounds already completed (0 for a new run).
        start_state: shared weights of the last checkpoint (None for a new run).
        start_average: the server's moving average at that checkpoint, if it kept one.
        server_state: the strategy's state at that checkpoint (``strategies.server_state``).
        pending_record: what the checkpoint's round recorded before a crash cut it off from the
            scores it awaited (they come with the next round's train replies): the resumed run
            completes its line.
    """

    folder: RunFolder
    cfg: RunConfig
    run_id: str
    done: int = 0
    start_state: dict[str, torch.Tensor] | None = None
    start_average: dict[str, torch.Tensor] | None = None
    server_state: dict[str, Any] | None = None
    pending_record: dict[str, Any] | None = None


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> RunConfig:
    """The config stored in ``run_dir/run.json`` with only ``RESUMABLE`` keys taken from
    ``overrides`` (kebab-case), pointed at ``run_dir`` wherever it now lives.

    Raises:
        ConfigError: no run.json, or an override a resume cannot honour.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise ConfigError(f"cannot resume: {run_dir / 'run.json'} not found")
    refused = sorted(set(overrides) - set(RESUMABLE))
    if refused:
        raise ConfigError(f"cannot change {refused} when resuming {run_dir}; a resume may change "
                          f"only {list(RESUMABLE)}")
    stored = {k: v for k, v in json.loads((run_dir / "run.json").read_text())["config"].items()
              if k not in RETIRED_KEYS}
    return RunConfig.from_dict({**stored, **overrides, "output-dir": str(run_dir.parent),
                                "run-name": run_dir.name, "resume": True})


def resume_overrides(cfg: RunConfig) -> dict[str, Any]:
    """The ``RESUMABLE`` keys to which a config from Flower's run config gives other values than
    the defaults. Flower's run config carries every key, given or not, so there a default means
    "keep the run's own value": a resume without ``round-timeout`` keeps the run's, rather than
    falling back to the default."""
    default, given = RunConfig().to_dict(), cfg.to_dict()
    return {k: given[k] for k in RESUMABLE if given[k] != default[k]}


def resumable(cfg: RunConfig) -> dict[str, Any]:
    """``cfg``'s ``RESUMABLE`` keys, every one as it is (a config built or resolved by its caller)."""
    given = cfg.to_dict()
    return {k: given[k] for k in RESUMABLE}


def _resume_point(folder: RunFolder) -> tuple[int, dict[str, Any]] | None:
    """(round, checkpoint) a resume continues after: the newest readable checkpoint whose round
    is logged, or the one after it if it kept what its round recorded (its scores were still to
    come). A checkpoint whose line was lost (torn by a crash or a full disk) is run again."""
    logged, damaged = folder.intact_rounds()
    last = logged[-1]["round"] if logged else 0
    if damaged is not None:
        log.warning("%s line %d is damaged (a write cut off by a crash or a full disk): the rounds "
                    "from there on run again", folder.rounds_path, damaged)
    found = latest_checkpoint(folder.dir, up_to=last + 1)
    if found is not None and found[0] == last + 1 and not found[1].get("pending_record"):
        log.warning("round %d was checkpointed but its rounds.jsonl line is missing: it runs again", last + 1)
        found = latest_checkpoint(folder.dir, up_to=last)
    return found


def open_run(cfg: RunConfig) -> OpenRun:
    """Create a new run folder, or reopen one to resume after its newest readable checkpoint
    whose round is logged (``_resume_point``); a resume takes ``cfg``'s ``RESUMABLE`` keys as they are.

    Raises:
        ConfigError: a new run's folder exists already, or a resume names no run.
    """
    if cfg.resume:
        if not cfg.run_name:
            raise ConfigError("run-config 'resume' needs 'run-name' (the run folder to continue)")
        folder = RunFolder(Path(cfg.output_dir) / cfg.run_name)
        cfg = resume_config(folder.dir, resumable(cfg))
        run_id = folder.read_run_info()["run_id"]
        found = _resume_point(folder)
        if found is None:
            log.warning("no readable checkpoint in %s: starting it from round 1", folder.dir)
            folder.keep_rounds_up_to(0)
            return OpenRun(folder, cfg, run_id)
        done, checkpoint = found
        logged = any(r["round"] == done for r in folder.keep_rounds_up_to(done))
        log.info("resuming %s after round %d", folder.dir, done)
        return OpenRun(folder, cfg, run_id, done, checkpoint["state_dict"],
                       checkpoint.get("average_state_dict"), checkpoint.get("server_state"),
                       None if logged else checkpoint.get("pending_record"))
    name = cfg.run_name or f"{Path(cfg.study_dir).name or 'run'}-{cfg.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = RunFolder(Path(cfg.output_dir) / name)
    if (folder.dir / "run.json").exists():
        raise ConfigError(f"run folder {folder.dir} already exists; pick another run-name or resume it")
    return OpenRun(folder, cfg.replace(run_name=name), secrets.token_hex(8))
