"""One device setting: auto takes CUDA where present; asking for CUDA without it is a clear error
that names the setting, before anything trains."""

import pytest
import torch

from fedseg.client.app import app as client_app
from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.devices import resolve_device
from fedseg.common.models import ModelSpec
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study
from tests.conftest import node_context, round_message, tiny_config

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_auto_is_cuda_where_present_and_bad_values_name_the_key():
    assert resolve_device("auto", "x") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu", "x") == "cpu"
    with pytest.raises(ConfigError, match="'device'"):
        RunConfig(device="gpu")


@NO_CUDA
def test_cuda_without_cuda_stops_a_simulation_before_round_1(study_2d, tmp_path):
    with pytest.raises(ConfigError, match=r"run-config 'device' = 'cuda' but this machine has 0 CUDA"):
        simulate(tiny_config(study_2d, tmp_path, device="cuda"), num_cpus=2)
    assert not tmp_path.joinpath("runs").exists()


@NO_CUDA
@pytest.mark.usefixtures("server_identity")
def test_a_hospitals_own_device_wins_and_a_missing_gpu_is_named(tmp_path):
    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=4, size=32, seed=0)
    cfg = RunConfig(channels=(8, 16), patch_size=32, batch_size=2, device="cuda")  # the server's wish
    spec = ModelSpec(2, 1, 3, (8, 16))
    ok = client_app(round_message(cfg, spec), node_context(site, tmp_path / "a", device="cpu"))
    assert not ok.has_error() and ok.content["metrics"]["cuda"] == 0.0
    refused = client_app(round_message(cfg.replace(device="cpu"), spec),
                         node_context(site, tmp_path / "b", device="cuda:1"))
    assert refused.has_error() and "node config 'device' = 'cuda:1'" in refused.error.reason
