"""Round metrics where ML teams already look: every rounds.jsonl line also goes to TensorBoard event
files in the run folder (``tracking=tensorboard``) and to an MLflow tracking store
(``tracking=mlflow``; ``mlflow-uri``, by default a SQLite file in the run folder).

Only what rounds.jsonl already holds is logged: each site's scalar training metrics and
validation scores, their means over the training and the held-out sites, and the round's time.
A tracker that fails is switched off with a warning; the run and its rounds.jsonl go on.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedseg.common.config import ConfigError, RunConfig
from fedseg.server.summary import site_spread

log = logging.getLogger(__name__)

MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracker -> the package it needs
TRAIN_SCALARS = ("train-loss", "epsilon")
EXPERIMENT = "fedseg"
RUN_ID_TAG = "fedseg.run-id"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")  # MLflow's metric-name alphabet; TensorBoard takes it too


def round_scalars(record: dict[str, Any], heldout_sites: set[str]) -> dict[str, float]:
    """Tag -> value of one rounds.jsonl line: ``train/<site>/<metric>``, ``val/<site>/<score>``,
    ``val/mean-training-sites/dice``, ``val/mean-heldout-sites/dice``, ``time/<site>/<part>`` and
    ``round/seconds``."""
    scalars: dict[str, float] = {"round/seconds": record["seconds"]} if "seconds" in record else {}
    for site, metrics in record["train"].items():
        scalars |= {f"train/{site}/{k}": metrics[k] for k in TRAIN_SCALARS if k in metrics}
    for site, scores in record["eval"].items():
        scalars |= {f"val/{site}/{k}": v for k, v in scores.items()
                    if k != "num-examples" and not k.startswith("group-cases:")}
    for site, parts in record.get("time", {}).items():
        scalars |= {f"time/{site}/{k}": v for k, v in parts.items()}
    for group, inside in (("training-sites", False), ("heldout-sites", True)):
        mean = site_spread({s: m.get("dice") for s, m in record["eval"].items()
                            if (s in heldout_sites) == inside})["mean"]
        if mean is not None:
            scalars[f"val/mean-{group}/dice"] = mean
    return {_UNSAFE.sub("_", tag): float(v) for tag, v in scalars.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in ``run_dir/tensorboard``; a resumed run drops what it is about to redo."""

    def __init__(self, run_dir: Path, done: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=done + 1 if done else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fedseg run (found again on resume by its ``fedseg.run-id`` tag), in the
    ``fedseg`` experiment, with the run config as its parameters."""

    def __init__(self, uri: str, cfg: RunConfig, run_id: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.run_name,
                                                 tags={RUN_ID_TAG: run_id}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in cfg.to_dict().items()]
            self.client.log_batch(self.run_id, params=params)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def check_trackers(cfg: RunConfig) -> None:
    """Stop before round 1 when a tracker's package is not installed.

    Raises:
        ConfigError: naming the tracker and the extra that installs it.
    """
    missing = [t for t in cfg.trackers() if importlib.util.find_spec(MODULES[t]) is None]
    if missing:
        raise ConfigError(f"run-config 'tracking' = '{cfg.tracking}': {', '.join(missing)} is not installed "
                          "here; pip install 'fedseg[tracking]'")


class RoundTracking:
    """The run's trackers, fed each rounds.jsonl line as it is written.

    Args:
        cfg: the run config (``tracking``, ``mlflow-uri``).
        run_dir: the run folder.
        run_id: the run's id (an MLflow run is found again by it).
        heldout_sites: the sites that only evaluate.
        done: rounds already completed (a resume).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str, heldout_sites: set[str], done: int = 0) -> None:
        self.heldout_sites = heldout_sites
        self.trackers: dict[str, Tracker] = {}
        for name in cfg.trackers():
            if (tracker := self._guarded(name, lambda name=name: _open(name, cfg, run_dir, run_id, done))):
                self.trackers[name] = tracker

    def log(self, record: dict[str, Any]) -> None:
        """Send one round's line to every tracker still on."""
        scalars = round_scalars(record, self.heldout_sites)
        for name, tracker in list(self.trackers.items()):
            self._guarded(name, lambda tracker=tracker: tracker.log(record["round"], scalars))

    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            self._guarded(name, tracker.close)

    def _guarded(self, name: str, call: Callable[[], Any]) -> Any:
        """``call()``, or None after switching the tracker off when it fails."""
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - a tracker must never stop a run; rounds.jsonl has it all
            log.warning("tracking to %s is off for the rest of the run: %s", name, err)
            self.trackers.pop(name, None)
            return None


def _open(name: str, cfg: RunConfig, run_dir: Path, run_id: str, done: int) -> Tracker:
    if name == "tensorboard":
        return TensorBoardTracker(run_dir, done)
    uri = cfg.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    log.info("round metrics go to MLflow at %s (experiment %s, run %s)", uri, EXPERIMENT, cfg.run_name)
    return MlflowTracker(uri, cfg, run_id)
