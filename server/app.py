"""fedseg ServerApp: discover sites, run Flower's strategy, log rounds, checkpoint, summarize."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.data import study_sites
from fedseg.common.models import ModelSpec, build_model, local_keys, split_state
from fedseg.common.records import CONFIG, shared_record
from fedseg.common.weights import load_pretrained
from fedseg.server.checkpoints import latest_checkpoint, save_checkpoint, save_global_model
from fedseg.server.evaluation import RoundRecorder, summarize
from fedseg.server.outputs import RunFolder, now, versions
from fedseg.server.report import write_report
from fedseg.server.strategies import build_strategy, client_level_privacy

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: the run config comes from pyproject + ``--run-config``."""
    run_federation(grid, RunConfig.from_dict(dict(context.run_config)))


class SiteDiscoveryError(RuntimeError):
    """Sites did not answer, disagree on the data shape, or failed their data check."""


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run (or resume) a whole federated study over the sites connected to ``grid``.

    Returns:
        The run folder (ARCHITECTURE §7).
    """
    folder, cfg, done, start_state = _open_run(cfg)
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    sites = discover_sites(grid, cfg, folder.dir)
    mspec = _model_spec(cfg, sites)
    torch.manual_seed(cfg.seed)
    model = build_model(mspec)
    local = local_keys(model, cfg.local_layers)
    pretrained = None
    if cfg.pretrained_weights and start_state is None:
        pretrained = load_pretrained(model, cfg.pretrained_weights)
    if start_state is not None:
        model.load_state_dict(start_state, strict=False)
    shared, _ = split_state(model, local)
    site_of = {node: info["site"] for node, info in sites.items()}
    heldout = {node for node, name in site_of.items() if name in cfg.heldout_sites}
    unknown = set(cfg.heldout_sites) - set(site_of.values())
    if unknown:
        raise ConfigError(f"run-config 'heldout-sites' names unknown site(s) {sorted(unknown)}; "
                          f"sites are {sorted(site_of.values())}")
    training_sites = sorted(n for node, n in site_of.items() if node not in heldout)
    if len(training_sites) < cfg.min_train_sites:
        raise ConfigError(f"run-config 'min-train-sites' = {cfg.min_train_sites} but only "
                          f"{len(training_sites)} training site(s) answered: {training_sites}")
    if done:
        info = {**folder.read_run_info(), "config": cfg.to_dict(), "resumed": now(),
                "resumed_from_round": done}
    else:
        info = {"config": cfg.to_dict(), "model": mspec.to_dict(), "versions": versions(),
                "sites": {i["site"]: _public(i) for i in sites.values()},
                "training_sites": training_sites, "heldout_sites": sorted(cfg.heldout_sites),
                "seed": cfg.seed, "started": now(), "ended": None,
                "pretrained": pretrained.to_dict() if pretrained else None}
    folder.write_run_info(info)

    recorder = RoundRecorder()
    strategy = build_strategy(cfg, site_of, heldout, recorder, round_offset=done)
    wire = ConfigRecord(_wire_config(cfg, mspec, folder.dir))
    round_started = [time.monotonic()]

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        rnd = server_round + done
        record = recorder.pop(rnd)
        record["seconds"] = round(time.monotonic() - round_started[0], 3)
        if (spent := client_level_privacy(strategy)) is not None:
            record["client-level-dp"] = spent
        round_started[0] = time.monotonic()
        save_checkpoint(folder.dir, rnd, arrays, mspec.to_dict(), sorted(local), cfg.patch_size)
        folder.append_round(record)
        _log_round(record, cfg.num_server_rounds)
        return None

    remaining = cfg.num_server_rounds - done
    final = ArrayRecord(shared)
    if remaining > 0:
        log.info("federated %s over %d site(s) (%s), %d round(s)%s", cfg.strategy,
                 len(training_sites), ", ".join(training_sites), cfg.num_server_rounds,
                 f", resuming after round {done}" if done else "")
        result = strategy.start(grid=grid, initial_arrays=shared_record(shared, local),
                                num_rounds=remaining, timeout=cfg.round_timeout, train_config=wire,
                                evaluate_config=wire, evaluate_fn=on_round_end)
        final = result.arrays if len(result.arrays) else final
    save_global_model(folder.dir, cfg.num_server_rounds, final, mspec.to_dict(), sorted(local),
                      cfg.patch_size)
    summary = summarize(folder.read_rounds(), training_sites, sorted(cfg.heldout_sites))
    summary["strategy"], summary["local_layers"] = cfg.strategy, cfg.local_layers
    folder.write_summary(summary)
    folder.write_run_info({**folder.read_run_info(), "ended": now()})
    try:
        write_report(folder.dir)
    except Exception as err:  # noqa: BLE001 - a failed report must not fail a finished run
        log.warning("report.html not written: %s (run `fedseg report %s` to retry)", err, folder.dir)
    return folder.dir


def discover_sites(grid: Grid, cfg: RunConfig, run_dir: Path) -> dict[int, dict[str, Any]]:
    """Ask every connected site for its data shape and data-check status (metadata only).

    Raises:
        SiteDiscoveryError: too few sites, a failed data check, or sites that disagree.
    """
    expected = (len(study_sites(cfg.study_dir, cfg.split_site)) if cfg.study_dir
                else cfg.min_train_sites + len(cfg.heldout_sites))
    deadline = time.monotonic() + cfg.round_timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < expected:
        raise SiteDiscoveryError(f"{len(nodes)} site(s) connected, {expected} expected")
    content = RecordDict({CONFIG: ConfigRecord(_discovery_config(cfg, run_dir))})
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


def _open_run(cfg: RunConfig) -> tuple[RunFolder, RunConfig, int, dict[str, torch.Tensor] | None]:
    if cfg.resume:
        if not cfg.run_name:
            raise ConfigError("run-config 'resume' needs 'run-name' (the run folder to continue)")
        folder = RunFolder(Path(cfg.output_dir) / cfg.run_name)
        if not (folder.dir / "run.json").is_file():
            raise ConfigError(f"cannot resume: {folder.dir / 'run.json'} not found")
        stored = RunConfig.from_dict(folder.read_run_info()["config"])
        cfg = stored.replace(num_server_rounds=cfg.num_server_rounds, round_timeout=cfg.round_timeout,
                             resume=True)
        found = latest_checkpoint(folder.dir)
        if found is None:
            log.warning("no readable checkpoint in %s: starting it from round 1", folder.dir)
            folder.keep_rounds_up_to(0)
            return folder, cfg, 0, None
        done, checkpoint = found
        folder.keep_rounds_up_to(done)
        log.info("resuming %s after round %d", folder.dir, done)
        return folder, cfg, done, checkpoint["state_dict"]
    name = cfg.run_name or f"{Path(cfg.study_dir).name or 'run'}-{cfg.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = RunFolder(Path(cfg.output_dir) / name)
    if (folder.dir / "run.json").exists():
        raise ConfigError(f"run folder {folder.dir} already exists; pick another run-name or resume it")
    return folder, cfg.replace(run_name=name), 0, None


def _model_spec(cfg: RunConfig, sites: dict[int, dict[str, Any]]) -> ModelSpec:
    info = next(iter(sites.values()))
    dims = int(info["spatial-dims"])
    if cfg.spatial_dims and cfg.spatial_dims != dims:
        raise ConfigError(f"run-config 'spatial-dims' = {cfg.spatial_dims} but the sites hold {dims}D data")
    if cfg.model == "maskrcnn":
        semantic = sorted(i["site"] for i in sites.values() if i["task"] != "instance")
        if semantic or dims != 2:
            raise ConfigError("run-config 'model' = 'maskrcnn' needs 2D sites with task=instance; "
                              + (f"semantic site(s): {semantic}" if semantic else f"the sites hold {dims}D data"))
    return ModelSpec.for_run(cfg, dims, int(info["in-channels"]), int(info["num-classes"]))


def _discovery_config(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": cfg.seed, "val-fraction": cfg.val_fraction}
    if cfg.study_dir:
        out |= {"study-dir": cfg.study_dir, "split-site": cfg.split_site, **_sim_state(run_dir)}
    return out


def _sim_state(run_dir: Path) -> dict[str, str]:
    """Simulation only: where each virtual site keeps its private state on this machine."""
    return {"sim-state-root": str((run_dir / "site-state").resolve())}


def _wire_config(cfg: RunConfig, mspec: ModelSpec, run_dir: Path) -> dict[str, Any]:
    """What every site receives each round: the run config and the model shape (never data)."""
    out: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        out[key] = ",".join(str(v) for v in value) if isinstance(value, list) else value
    out |= {"model-spatial-dims": mspec.spatial_dims, "model-in-channels": mspec.in_channels,
            "model-out-channels": mspec.out_channels}
    if cfg.study_dir:
        out |= _sim_state(run_dir)
    return out


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("site", "problems")}


def _log_round(record: dict[str, Any], total: int) -> None:
    loss = ", ".join(f"{s} {m['train-loss']:.3f}" for s, m in record["train"].items())
    dice = ", ".join(f"{s} {m.get('dice', float('nan')):.3f}" for s, m in record["eval"].items())
    aji = ", ".join(f"{s} {m['aji']:.3f}" for s, m in record["eval"].items() if m.get("aji") is not None)
    eps = ", ".join(f"{s} {m['epsilon']:.2f}" for s, m in record["train"].items() if "epsilon" in m)
    log.info("round %d/%d done in %.1fs | train loss: %s | val dice: %s%s%s", record["round"], total,
             record["seconds"], loss or "-", dice or "-", f" | val AJI: {aji}" if aji else "",
             f" | epsilon: {eps}" if eps else "")
    for site, reason in record["errors"].items():
        log.warning("round %d: site %s: %s", record["round"], site, reason)
