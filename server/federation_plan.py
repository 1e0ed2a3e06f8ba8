"""The federation's dataset fingerprint and nnU-Net's plan from it, made at discovery from the
training sites' own fingerprints (``common/plan.py``) and kept in the run folder as ``plan.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedseg.common.config import RunConfig
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.plan import FINGERPRINT, Fingerprint, describe, plan_federation, resampling_grid, write_plan

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"


def read_plan(run_dir: Path) -> dict[str, Any] | None:
    """The configurations of the run's ``plan.json`` (None where the run has none)."""
    path = run_dir / PLAN_FILE
    return json.loads(path.read_text())["configurations"] if path.is_file() else None


def write_federation_plan(sites: dict[int, dict[str, Any]], training: list[str],
                          run_dir: Path) -> dict[str, Any] | None:
    """Merge the fingerprints the training sites sent, warn about a site far from the others,
    log the plan and write it to ``run_dir/plan.json``.

    Args:
        sites: node id -> discovery answer.
        training: the training sites' names (held-out sites never shape the plan).

    Returns:
        The plan's configurations (``3d``, ``2d``), or None where no training site sent a fingerprint.
    """
    parts, missing = {}, []
    for info in sites.values():
        if info["site"] not in training:
            continue
        if FINGERPRINT in info:
            parts[info["site"]] = Fingerprint.from_json(json.loads(str(info[FINGERPRINT])))
        else:
            missing.append(f"{info['site']} ({info.get('no-fingerprint', 'none sent')})")
    if missing:
        log.info("no dataset fingerprint from %s: the plan describes the other sites' cases", ", ".join(missing))
    if not parts:
        return None
    try:
        plans, merged, notes = plan_federation(parts)
    except ValueError as err:  # e.g. sites of different dimensionality: discovery refuses those anyway
        log.warning("no plan for this federation: %s", err)
        return None
    for note in notes:
        log.warning("%s", note)
    log.info("what nnU-Net would plan for the training sites' pooled cases (%s):\n%s", PLAN_FILE,
             describe(plans, merged))
    write_plan(run_dir / PLAN_FILE, plans, merged)
    return read_plan(run_dir)


def run_spacing(cfg: RunConfig, spec: ModelSpec, run_dir: Path) -> tuple[float, ...]:
    """The voxel spacing every site resamples its images to (run-config ``spacing``): the plan's
    target spacing for a per-pixel network, where some training case lies off that grid
    (``plan.resampling_grid``); empty (each image's own grid) otherwise."""
    path = run_dir / PLAN_FILE
    if not spec.kind.dense or not path.is_file():
        return ()
    if cfg.spacing == "native":
        log.info("run-config spacing=native: the network sees each image on its own grid")
        return ()
    saved = json.loads(path.read_text())
    plan, fp = saved["configurations"].get(f"{spec.spatial_dims}d"), Fingerprint.from_json(saved["fingerprint"])
    target = resampling_grid(plan, fp)
    if target:
        log.info("every site resamples its images to the plan's %s mm grid for the network (run-config "
                 "spacing=%s; labels nearest-neighbour); Dice, HD95 and predictions come back in each image's "
                 "own geometry", " x ".join(f"{t:.3g}" for t in target), cfg.spacing)
    elif plan is not None and fp.units == "mm":
        log.info("every training case already lies on the plan's %s mm grid: no site resamples",
                 " x ".join(f"{t:.3g}" for t in plan["spacing"]))
    return target
