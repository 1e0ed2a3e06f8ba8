"""Broken or hostile sites in Flower's real simulation engine: the coordinator refuses their
replies, the round goes on with the honest sites, and the global model is exactly the one the
honest sites alone make."""

import shutil

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedseg.client import app as site_app
from fedseg.client.site import site_of_message
from fedseg.common.records import packed_record, unpacked_record
from fedseg.server.app import run_federation
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study
from tests.conftest import read_rounds, tiny_config


def _weights(reply: Message, change) -> None:
    arrays = {k: v.numpy().copy() for k, v in unpacked_record(reply.content["arrays"]).items()}
    change(arrays)
    reply.content["arrays"] = packed_record(ArrayRecord({k: Array(v) for k, v in arrays.items()}))


def _nan(reply: Message) -> None:
    def poison(arrays):
        arrays[next(iter(arrays))].flat[0] = float("nan")
    _weights(reply, poison)


def _wrong_shape(reply: Message) -> None:
    def reshape(arrays):
        name = next(iter(arrays))
        arrays[name] = arrays[name].ravel()[:-1].copy()
    _weights(reply, reshape)


def _billion_cases(reply: Message) -> None:
    reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "num-examples": 10**9})


HOSTILE = {"site-c": _nan, "site-d": _wrong_shape, "site-e": _billion_cases}


def _hostile_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost: what a site's replies become on a broken or hostile node, as they leave it."""
    reply = call_next(msg, context)
    site = site_of_message(dict(context.node_config), msg)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error() and site.ref.name in HOSTILE:
        HOSTILE[site.ref.name](reply)
    return reply


hostile_app = ClientApp(mods=[_hostile_mod, *site_app.app._mods])
hostile_app.query()(site_app.query)
hostile_app.train()(site_app.train)
hostile_app.evaluate()(site_app.evaluate)


def test_nan_wrong_shape_and_inflated_counts_are_refused_and_the_model_is_the_honest_sites(tmp_path):
    study = tmp_path / "study"
    write_study(study, sites=5, dims=2, cases=6, size=32, shift=0.5, seed=5)
    cfg = tiny_config(study, tmp_path / "runs", run_name="hostile", local_layers="none", min_train_sites=2)
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg)

    run_simulation(server_app=server, client_app=hostile_app, num_supernodes=5,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"address": "local", "num_cpus": 2, "logging_level": "ERROR"}})
    run_dir = tmp_path / "runs" / "hostile"
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(record["train"]) == ["site-a", "site-b"]
        errors = record["errors"]
        assert "non-finite value" in errors["site-c"]
        assert "the model's is torch.float32" in errors["site-d"]
        assert "num-examples = 1000000000 where the site declared" in errors["site-e"]
    honest = tmp_path / "honest"
    for site in ("site-a", "site-b"):
        shutil.copytree(study / site, honest / site)
    reference = simulate(tiny_config(honest, tmp_path / "runs", run_name="honest", local_layers="none",
                                     min_train_sites=2), num_cpus=2)
    got = torch.load(run_dir / "model" / "global.pt", weights_only=True)["state_dict"]
    want = torch.load(reference / "model" / "global.pt", weights_only=True)["state_dict"]
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
