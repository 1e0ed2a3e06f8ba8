"""Discover the sites of a federation: who is connected, what their data looks like (metadata
only), and whether they agree on a model shape."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.round_config import SiteData
from fedseg.common.data import study_sites
from fedseg.common.records import CONFIG


class SiteDiscoveryError(RuntimeError):
    """Sites did not answer, disagree on the data shape, or failed their data check."""


def discover_sites(grid: Grid, cfg: RunConfig, data: SiteData) -> dict[int, dict[str, Any]]:
    """Ask every connected site for its data shape and data-check status (metadata only).

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
    if len(nodes) < expected:
        raise SiteDiscoveryError(f"{len(nodes)} site(s) connected, {expected} expected")
    content = RecordDict({CONFIG: ConfigRecord(data.to_record())})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
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
    if len(replies) < len(nodes):
        problems.append(f"{len(nodes) - len(replies)} site(s) did not answer within {cfg.round_timeout}s")
    if problems:
        raise SiteDiscoveryError("cannot start the run:\n  " + "\n  ".join(problems))
    names = [i["site"] for i in sites.values()]
    if len(set(names)) != len(names):
        raise SiteDiscoveryError(f"two nodes claim the same site name: {sorted(names)}")
    for key in ("spatial-dims", "in-channels", "num-classes"):
        values = {i["site"]: i[key] for i in sites.values()}
        if len(set(values.values())) > 1:
            raise SiteDiscoveryError(f"sites disagree on {key}: {values}")
    return sites


def model_for_sites(cfg: RunConfig, sites: dict[int, dict[str, Any]]) -> ModelSpec:
    """The run's model for the data the sites reported.

    Raises:
        ConfigError: the sites' data does not fit the configured model kind.
    """
    info = next(iter(sites.values()))
    dims = int(info["spatial-dims"])
    if cfg.spatial_dims and cfg.spatial_dims != dims:
        raise ConfigError(f"run-config 'spatial-dims' = {cfg.spatial_dims} but the sites hold {dims}D data")
    spec = cfg.model_spec(dims, int(info["in-channels"]), int(info["num-classes"]))
    kind = spec.kind
    misfits = sorted(i["site"] for i in sites.values() if kind.site_task and i["task"] != kind.site_task)
    if misfits or dims not in kind.dims:
        raise ConfigError(f"run-config 'model' = '{cfg.model}' needs {'/'.join(map(str, kind.dims))}D "
                          f"sites{f' with task={kind.site_task}' if kind.site_task else ''}; "
                          + (f"site(s) of another task: {misfits}" if misfits else f"the sites hold {dims}D data"))
    return spec


def site_names(sites: dict[int, dict[str, Any]], cfg: RunConfig) -> tuple[dict[int, str], set[int], list[str]]:
    """(node id -> site name, held-out node ids, sorted training site names).

    Raises:
        ConfigError: ``heldout-sites`` names an unknown site, or too few sites train.
    """
    site_of = {node: info["site"] for node, info in sites.items()}
    heldout = {node for node, name in site_of.items() if name in cfg.heldout_sites}
    unknown = set(cfg.heldout_sites) - set(site_of.values())
    if unknown:
        raise ConfigError(f"run-config 'heldout-sites' names unknown site(s) {sorted(unknown)}; "
                          f"sites are {sorted(site_of.values())}")
    training = sorted(n for node, n in site_of.items() if node not in heldout)
    if len(training) < cfg.min_train_sites:
        raise ConfigError(f"run-config 'min-train-sites' = {cfg.min_train_sites} but only "
                          f"{len(training)} training site(s) answered: {training}")
    return site_of, heldout, training
