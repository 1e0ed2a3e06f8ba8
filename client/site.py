"""Which site am I (deployment node config or simulation partition), and what does it hold."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.client.site_policy import POLICY_KEYS, SitePolicy
from fedseg.common.round_config import SiteData
from fedseg.common.devices import resolve_device
from fedseg.common.data import DataError, SiteRef, SiteSpec, check_site, distance_unit, read_site, split_training, study_sites
from fedseg.common.plan import FINGERPRINT, site_fingerprint
from fedseg.common.transforms import image_channels

log = logging.getLogger(__name__)

SIM_POLICIES_FILE = "site_policies.json"
# What a hospital may set in its SuperNode's node config (Flower adds the partition keys in simulation).
NODE_CONFIG_KEYS = ("site-dir", "state-dir", "site-name", "device", "pretrained-weights", "tensorboard",
                    *POLICY_KEYS)
FLOWER_NODE_KEYS = ("partition-id", "num-partitions")


@dataclass(frozen=True)
class SiteLocation:
    """A site's data and its private state folder, plus the compute device its node config sets
    ("" when it leaves it to the run), its own pretrained weights file (node config
    ``pretrained-weights``; "" for none) and whether it keeps TensorBoard curves of its own
    training in its state dir (node config ``tensorboard``)."""

    ref: SiteRef
    state_dir: Path
    device: str = ""
    policy: SitePolicy = SitePolicy()
    pretrained: str = ""
    tensorboard: bool = False


def resolve_site(node_config: dict[str, Any], data: SiteData | None) -> SiteLocation:
    """Find this node's site.

    Deployment: the hospital's node config names ``site-dir`` and ``state-dir``; paths sent by
    the server are never used. Simulation: nodes only get ``partition-id``, mapped to the sorted
    sites of the server's ``study-dir`` (``split-site`` virtual sites included), with state under
    the run's state root.

    The site's privacy policy comes from its node config (deployment) or, in simulation, where
    no node has its own config, from ``STUDY_DIR/site_policies.json`` (``{"site-a": {...}}``).

    Raises:
        DataError: neither form of site identity is available, or the partition is out of range.
    """
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS) - set(FLOWER_NODE_KEYS))
    if unknown:  # a mistyped policy key (max_epsilon) would silently leave the budget unset
        raise DataError(f"node config has unknown key(s) {unknown}; fedseg reads {list(NODE_CONFIG_KEYS)}")
    device = str(node_config.get("device", ""))
    if "site-dir" in node_config:
        site_dir = Path(str(node_config["site-dir"]))
        if "state-dir" not in node_config:
            raise DataError("node config names 'site-dir' but no 'state-dir' (where local layers are kept)")
        name = str(node_config.get("site-name", site_dir.name))
        policy = _policy(node_config, "node config")
        return SiteLocation(SiteRef(name, site_dir), Path(str(node_config["state-dir"])), device, policy,
                            str(node_config.get("pretrained-weights", "")),
                            str(node_config.get("tensorboard", "false")).lower() == "true")
    if "partition-id" not in node_config or data is None or not data.study_dir:
        raise DataError("this node has no 'site-dir' in its node config (deployment) and no "
                        "partition-id/study-dir (simulation): cannot tell which site it is")
    study = Path(data.study_dir)
    sites = _simulated_sites(data.study_dir, data.split_site, study.stat().st_mtime_ns if study.is_dir() else 0)
    pid = int(node_config["partition-id"])
    if pid >= len(sites):
        raise DataError(f"partition-id {pid} but the study has only {len(sites)} site(s)")
    ref = sites[pid]
    if not data.state_root:
        raise DataError("simulation message without a state root: nowhere to keep site state")
    policies_file = Path(data.study_dir) / SIM_POLICIES_FILE
    policy = SitePolicy()
    if policies_file.is_file():
        try:
            policies = json.loads(policies_file.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{policies_file}: not valid JSON ({err})") from None
        mine = policies.get(ref.name, {})
        unknown = sorted(set(mine) - set(POLICY_KEYS))
        if unknown:
            raise DataError(f"{policies_file} [{ref.name}]: unknown key(s) {unknown}; a site policy "
                            f"has {list(POLICY_KEYS)}")
        policy = _policy(mine, f"{policies_file} [{ref.name}]")
    return SiteLocation(ref, sim_state_dir(data.state_root, ref.name), "", policy)


def site_of_message(node_config: dict[str, Any], msg: Any) -> SiteLocation | None:
    """The site a message is for, from the node config and the message's config (None when
    neither tells: then nothing of a site's was sent)."""
    from fedseg.common.records import CONFIG  # Flower's records: only the apps import this

    record = msg.content.config_records.get(CONFIG)
    try:
        data = SiteData.from_record(record) if record is not None else None
    except ValueError:  # a malformed config: a deployed node still knows its own site
        data = None
    try:
        return resolve_site(node_config, data)
    except ValueError:
        return None


def sim_state_dir(state_root: str | Path, site: str) -> Path:
    """Simulation: a virtual site's state folder under the run's state root."""
    return Path(state_root) / site.replace("#", "-part")


def site_device(site: SiteLocation, run_device: str) -> str:
    """The device this site computes on: its node config's ``device`` (the hospital owns its
    hardware), else the run's; ``auto`` picks CUDA where present.

    Raises:
        DataError: CUDA asked for on a machine without it.
    """
    source = "node config 'device'" if site.device else "run-config 'device'"
    try:
        return resolve_device(site.device or run_device, source)
    except ValueError as err:
        raise DataError(f"site {site.ref.name}: {err}") from None


def describe_site(site: SiteLocation, data: SiteData, fingerprint: bool = False) -> tuple[dict[str, Any], list[str]]:
    """(what the server may know, the data-check problems that stay at the site): the data
    contract status and dataset shape, metadata only, no file names; with ``fingerprint``, also
    the dataset fingerprint of its training cases (JSON, ``common/plan.py``) unless the site's
    policy keeps it (``share-fingerprint``), or why there is none. A simulated site is not
    checked again: ``simulate`` checked every site folder on this machine before starting."""
    problems = [] if data.study_dir else check_site(site.ref.site_dir)
    if problems:
        return {"site": site.ref.name, "problems": len(problems)}, problems
    spec = read_site(site.ref, seed=data.seed)
    train, val = split_training(spec, data.val_fraction, data.seed)
    info = {"site": site.ref.name, "problems": 0, "spatial-dims": spec.spatial_dims,
            "in-channels": image_channels(spec), "num-classes": spec.num_classes, "task": spec.task,
            "label-names": [spec.labels.get(i, str(i)) for i in range(spec.num_classes)],
            "distance-unit": distance_unit(spec), "modality": spec.modality,
            "num-train": len(train) if spec.training else 0, "num-val": len(val)}
    if fingerprint and spec.training:
        info |= _fingerprint(site, spec)
    return info, []


def _fingerprint(site: SiteLocation, spec: SiteSpec) -> dict[str, str]:
    """``fingerprint`` (JSON) of the site's training cases, or ``no-fingerprint``: why not."""
    if not site.policy.share_fingerprint:
        log.info("site %s: its policy keeps its dataset fingerprint (share-fingerprint = false)", spec.name)
        return {"no-fingerprint": "the site's policy keeps it"}
    try:
        return {FINGERPRINT: json.dumps(site_fingerprint(spec).to_json())}
    except DataError as err:  # the detail, with the file, stays in the site's log
        log.error("site %s: no dataset fingerprint: %s", spec.name, err)
        return {"no-fingerprint": "a training case could not be read (the site's log names it)"}


@functools.lru_cache(maxsize=8)
def _simulated_sites(study_dir: str, split_site: int, mtime_ns: int) -> list[SiteRef]:
    """The study's sites, listed once per worker process while the study folder is unchanged
    (a site added or removed changes its mtime): every message of every virtual site asks."""
    return study_sites(study_dir, split_site)


def _policy(raw: dict[str, Any], source: str) -> SitePolicy:
    try:
        return SitePolicy.from_config(raw, source)
    except ValueError as err:
        raise DataError(str(err)) from None

