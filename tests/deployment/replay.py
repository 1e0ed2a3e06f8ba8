"""The uninterrupted simulation of a deployed run's sequence: the run's own config in Flower's
simulation engine, each site failing exactly the training rounds that rounds.jsonl shows it
missed in the deployment (a site killed mid-round, a site not yet back)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedseg.client import app as site_app
from fedseg.client.site import site_of_message
from fedseg.common.config import RunConfig
from fedseg.common.records import CONFIG
from fedseg.server.app import run_federation
from fedseg.server.run_folder import RunFolder
from fedseg.simulations.engine import prompt_engine

MISSED = "FEDSEG_REPLAY_MISSED"  # site -> the rounds it missed, as JSON (Ray's workers inherit it)


def missed_rounds(rounds: list[dict], sites: list[str]) -> dict[str, list[int]]:
    """Site -> the rounds whose training it is not part of, from a run's rounds.jsonl."""
    return {site: [r["round"] for r in rounds if site not in r["train"]] for site in sites}


def _missing_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost: a training message of a round the site missed gets an error, nothing trained."""
    if msg.metadata.message_type == MessageType.TRAIN:
        site = site_of_message(dict(context.node_config), msg)
        if int(msg.content[CONFIG]["server-round"]) in json.loads(os.environ[MISSED]).get(site.ref.name, []):
            return Message(Error(code=0, reason="missed this round in the deployed run"), reply_to=msg)
    return call_next(msg, context)


replay_app = ClientApp(mods=[_missing_mod, *site_app.app._mods])
replay_app.query()(site_app.query)
replay_app.train()(site_app.train)
replay_app.evaluate()(site_app.evaluate)


def replay(run_dir: Path, study: Path, work: Path) -> Path:
    """Simulate ``run_dir``'s run uninterrupted over copies of its sites from ``study``, with
    every site missing the rounds it missed there; returns the simulated run's folder."""
    folder = RunFolder(run_dir)
    info, rounds = folder.read_run_info(), folder.read_rounds()
    sites = sorted(info["sites"])
    for site in sites:
        shutil.copytree(study / site, work / "study" / site)
    cfg = RunConfig.from_dict(info["config"]).replace(
        study_dir=str(work / "study"), output_dir=str(work / "runs"), run_name="replay", resume=False)
    os.environ[MISSED] = json.dumps(missed_rounds(rounds, info["training_sites"]))
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg)

    with prompt_engine():
        run_simulation(server_app=server, client_app=replay_app, num_supernodes=len(sites),
                       backend_config={"client_resources": {"num_cpus": 1},
                                       "init_args": {"address": "local", "num_cpus": 2, "logging_level": "ERROR"}})
    return work / "runs" / "replay"
