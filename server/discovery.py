"""Discover the sites of a federation: who is connected, what their data looks like (metadata
only), and whether they agree on a model shape; admit a site of the run that connects late."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.round_config import SiteData
from fedseg.common.data import study_sites
from fedseg.common.plan import FINGERPRINT
from fedseg.common.records import CONFIG

log = logging.getLogger(__name__)

SHAPE_KEYS = ("spatial-dims", "in-channels", "num-classes")  # what every site of a run agrees on


class SiteDiscoveryError(RuntimeError):
    """Sites did not answer, disagree on the data shape, or failed their data check."""


def discover_sites(grid: Grid, cfg: RunConfig, data: SiteData,
                   cohort: dict[str, dict[str, Any]] | None = None) -> dict[int, dict[str, Any]]:
    """Ask every connected site for its data shape and data-check status (metadata only); a new
    U-Net run also asks for each site's dataset fingerprint (``server/federation_plan.py``).

    Args:
        cohort: a resumed run's sites (run.json's ``sites``): one that is down or silent does not
            stop the resume (``LateSites`` admits it when it answers), and a node of another site
            is left out; None: a new run, which every connected site must answer.

    Returns:
        node id -> what the site reported (``site``, ``spatial-dims``, ``in-channels``, ...).

    Raises:
        SiteDiscoveryError: too few sites, a failed data check, or sites that disagree.
    """
    expected = (len(study_sites(data.study_dir, data.split_site)) if data.study_dir
                else cfg.min_train_sites + len(cfg.heldout_sites))
    deadline = time.monotonic() + cfg.round_timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < expected and cohort is None:
        raise SiteDiscoveryError(f"{len(nodes)} site(s) connected, {expected} expected")
    sites, problems, silent = ask_sites(grid, nodes, data, cfg.round_timeout,
                                        fingerprint=cohort is None and cfg.model_kind.dense)
    if silent and cohort is None:
        problems.append(f"{len(silent)} site(s) did not answer within {cfg.round_timeout}s")
    elif silent:
        log.warning("node(s) %s did not answer within %gs: the resumed run goes on without them and admits "
                    "them before a later round once they answer", ", ".join(map(str, silent)), cfg.round_timeout)
    if problems:
        raise SiteDiscoveryError("cannot start the run:\n  " + "\n  ".join(problems))
    if cohort is not None:
        for node, info in list(sites.items()):
            if (why := cohort_misfit(info, cohort)) is not None:
                log.warning("node %d left out of the resumed run: %s", node, why)
                del sites[node]
    names = [i["site"] for i in sites.values()]
    if len(set(names)) != len(names):
        raise SiteDiscoveryError(f"two nodes claim the same site name: {sorted(names)}")
    for key in SHAPE_KEYS:
        values = {i["site"]: i[key] for i in sites.values()}
        if len(set(values.values())) > 1:
            raise SiteDiscoveryError(f"sites disagree on {key}: {values}")
    return sites


def ask_sites(grid: Grid, nodes: list[int], data: SiteData, timeout: float, fingerprint: bool = False
              ) -> tuple[dict[int, dict[str, Any]], list[str], list[int]]:
    """Send the discovery question to ``nodes`` (with ``fingerprint``: asking for their dataset
    fingerprints too).

    Returns:
        (node id -> what its site answered, the problems of those that answered with one, the
        nodes that did not answer within ``timeout`` seconds).
    """
    content = RecordDict({CONFIG: ConfigRecord(data.to_record() | ({FINGERPRINT: True} if fingerprint else {}))})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    # a node the SuperLink already knows is down answers with Flower's "node unavailable" error:
    # it is as silent as one that does not answer in time
    replies = [r for r in grid.send_and_receive(messages, timeout=timeout)
               if not (r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE)]
    sites: dict[int, dict[str, Any]] = {}
    problems = []
    for reply in replies:
        if reply.has_error():
            problems.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        info = dict(reply.content[CONFIG])
        if info["problems"]:
            problems.append(f"site {info['site']} failed its data check ({info['problems']} problem(s)); "
                            f"run `fedseg check` on its site folder for the list")
        sites[reply.metadata.src_node_id] = info
    answered = {r.metadata.src_node_id for r in replies}
    return sites, problems, [n for n in nodes if n not in answered]


def cohort_misfit(info: dict[str, Any], cohort: dict[str, dict[str, Any]]) -> str | None:
    """Why a site's discovery answer does not fit a run that started with ``cohort`` (None: it fits)."""
    site = info["site"]
    if site not in cohort:
        return f"site {site} is not one of the run's sites {sorted(cohort)} (a new site joins a new run)"
    changed = [k for k in (*SHAPE_KEYS, "task") if k in cohort[site] and info[k] != cohort[site][k]]
    if changed:
        return (f"site {site} now reports " + ", ".join(f"{k}={info[k]} (was {cohort[site][k]})" for k in changed))
    return None


class LateSites:
    """Sites of a run that connect after its discovery (down or silent when the run started or
    resumed): asked the discovery question before a round, admitted when they fit the run's
    cohort and pass their data check; a node that cannot fit is refused for the run, once.

    Args:
        data: the discovery question (``SiteData``).
        cohort: the run's sites as run.json records them (site -> what it reported).
        heldout_sites: the names of the cohort's held-out sites.
        timeout: seconds to wait for an answer, > 0.
    """

    def __init__(self, data: SiteData, cohort: dict[str, dict[str, Any]], heldout_sites: set[str],
                 timeout: float) -> None:
        self.data, self.cohort, self.heldout_sites, self.timeout = data, cohort, heldout_sites, timeout
        self.refused: set[int] = set()

    def admit(self, grid: Grid, known: dict[int, str]) -> dict[int, dict[str, Any]]:
        """Ask the connected nodes not in ``known`` (node -> site) nor refused.

        Returns:
            node id -> discovery answer of each node admitted now.
        """
        new = [n for n in grid.get_node_ids() if n not in known and n not in self.refused]
        if not new:
            return {}
        sites, _, _ = ask_sites(grid, new, self.data, self.timeout)  # a silent node is asked again next round
        admitted = {}
        for node, info in sites.items():
            why = cohort_misfit(info, self.cohort)
            if why is None and info["problems"]:
                why = f"site {info['site']} failed its data check; run `fedseg check` on its site folder"
            if why is None and info["site"] in known.values():
                why = f"site {info['site']} is already in the run as another node"
            if why is None:
                admitted[node] = info
                log.info("site %s (node %d) joins the run", info["site"], node)
            else:
                log.warning("node %d is not admitted: %s", node, why)
                self.refused.add(node)
        return admitted


def model_for_sites(cfg: RunConfig, sites: dict[int, dict[str, Any]],
                    plans: dict[str, Any] | None = None) -> tuple[ModelSpec, tuple[int, ...]]:
    """The run's model and patch for the data the sites reported (``plans``: plan.json's
    configurations, which ``model=auto`` builds from).

    Raises:
        ConfigError: the sites' data does not fit the configured model kind, or model=auto has no plan.
    """
    info = next(iter(sites.values()))
    dims = int(info["spatial-dims"])
    if cfg.spatial_dims and cfg.spatial_dims != dims:
        raise ConfigError(f"run-config 'spatial-dims' = {cfg.spatial_dims} but the sites hold {dims}D data")
    spec, patch = cfg.network(dims, int(info["in-channels"]), int(info["num-classes"]), plans)
    kind = spec.kind
    misfits = sorted(i["site"] for i in sites.values() if kind.site_task and i["task"] != kind.site_task)
    if misfits or dims not in kind.dims:
        raise ConfigError(f"run-config 'model' = '{cfg.model}' needs {'/'.join(map(str, kind.dims))}D "
                          f"sites{f' with task={kind.site_task}' if kind.site_task else ''}; "
                          + (f"site(s) of another task: {misfits}" if misfits else f"the sites hold {dims}D data"))
    return spec, patch


def site_names(sites: dict[int, dict[str, Any]], cfg: RunConfig, cohort: list[str] | None = None
               ) -> tuple[dict[int, str], set[int], list[str]]:
    """(node id -> site name, held-out node ids, sorted training site names).

    Args:
        cohort: a resumed run's sites: the training sites are its own, whichever answered now.

    Raises:
        ConfigError: ``heldout-sites`` names an unknown site, or too few sites train.
    """
    site_of = {node: info["site"] for node, info in sites.items()}
    heldout = {node for node, name in site_of.items() if name in cfg.heldout_sites}
    unknown = set(cfg.heldout_sites) - set(cohort if cohort is not None else site_of.values())
    if unknown:
        raise ConfigError(f"run-config 'heldout-sites' names unknown site(s) {sorted(unknown)}; "
                          f"sites are {sorted(site_of.values())}")
    answered = sorted(n for node, n in site_of.items() if node not in heldout)
    if len(answered) < cfg.min_train_sites:
        raise ConfigError(f"run-config 'min-train-sites' = {cfg.min_train_sites} but only "
                          f"{len(answered)} training site(s) answered: {answered}")
    training = answered if cohort is None else sorted(set(cohort) - set(cfg.heldout_sites))
    return site_of, heldout, training
