"""Broken or hostile sites in Flower's real simulation engine: the coordinator refuses their
replies, the round goes on with the honest sites, and the global model is exactly the one the
honest sites alone make."""

import shutil

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedseg.server.app import run_federation
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study
from tests.conftest import read_rounds, tiny_config
from tests.simulations.hostile import hostile_app


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
