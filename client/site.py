"""One resolver for "which site am I": node config in deployment, partition-id in simulation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.client.privacy import SitePolicy
from fedseg.common.data import DataError, SiteRef, study_sites

SIM_POLICIES_FILE = "site_policies.json"


@dataclass(frozen=True)
class SiteLocation:
    """A site's data and its private state folder, plus the compute device it asked for and
    its own pretrained weights file (node config ``pretrained-weights``; "" for none)."""

    ref: SiteRef
    state_dir: Path
    device: str = "cpu"
    policy: SitePolicy = SitePolicy()
    pretrained: str = ""


def resolve_site(node_config: dict[str, Any], config: dict[str, Any]) -> SiteLocation:
    """Find this node's site.

    Deployment: the hospital's node config names ``site-dir`` and ``state-dir``; paths sent by
    the server are never used. Simulation: nodes only get ``partition-id``, mapped to the sorted
    sites of the server's ``study-dir`` (``split-site`` virtual sites included), with state under
    the run's ``sim-state-root``.

    The site's privacy policy comes from its node config (deployment) or, in simulation, where
    no node has its own config, from ``STUDY_DIR/site_policies.json`` (``{"site-a": {...}}``).

    Raises:
        DataError: neither form of site identity is available, or the partition is out of range.
    """
    device = str(node_config.get("device", "cpu"))
    if "site-dir" in node_config:
        site_dir = Path(str(node_config["site-dir"]))
        if "state-dir" not in node_config:
            raise DataError("node config names 'site-dir' but no 'state-dir' (where local layers are kept)")
        name = str(node_config.get("site-name", site_dir.name))
        policy = _policy(node_config, "node config")
        return SiteLocation(SiteRef(name, site_dir), Path(str(node_config["state-dir"])), device, policy,
                            str(node_config.get("pretrained-weights", "")))
    if "partition-id" not in node_config or not config.get("study-dir"):
        raise DataError("this node has no 'site-dir' in its node config (deployment) and no "
                        "partition-id/study-dir (simulation): cannot tell which site it is")
    sites = study_sites(str(config["study-dir"]), int(config.get("split-site", 0)))
    pid = int(node_config["partition-id"])
    if pid >= len(sites):
        raise DataError(f"partition-id {pid} but the study has only {len(sites)} site(s)")
    ref = sites[pid]
    if not config.get("sim-state-root"):
        raise DataError("simulation message without 'sim-state-root': nowhere to keep site state")
    state_root = Path(str(config["sim-state-root"]))
    policies_file = Path(str(config["study-dir"])) / SIM_POLICIES_FILE
    policy = SitePolicy()
    if policies_file.is_file():
        try:
            policies = json.loads(policies_file.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{policies_file}: not valid JSON ({err})") from None
        policy = _policy(policies.get(ref.name, {}), f"{policies_file} [{ref.name}]")
    return SiteLocation(ref, state_root / ref.name.replace("#", "-part"), device, policy)


def _policy(raw: dict[str, Any], source: str) -> SitePolicy:
    try:
        return SitePolicy.from_config(raw, source)
    except ValueError as err:
        raise DataError(str(err)) from None
