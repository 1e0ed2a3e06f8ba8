"""GPU-only checks: they need a CUDA device, so on a machine without one they skip (CI has none;
run them on a GPU machine: `python -m pytest tests/gpu`)."""

import pytest
import torch

from fedseg.client.app import app as client_app
from fedseg.common.config import RunConfig
from fedseg.common.data import read_site
from fedseg.common.models import ModelSpec
from fedseg.simulations.synth import write_study
from tests.conftest import node_context, round_message

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("server_identity")]


def test_a_dp_round_trains_on_the_hospitals_gpu(tmp_path):
    """Opacus draws noise where the parameters are: the noise generator must live on the GPU."""
    (site,) = write_study(tmp_path / "study", sites=1, dims=3, cases=6, size=32, seed=0)
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.0, batch_size=2, channels=(8, 16), patch_size=16,
                    device="cpu")  # the hospital's node config wins over the server's wish
    reply = client_app(round_message(cfg, ModelSpec(3, 1, 3, (8, 16))),
                       node_context(site, tmp_path / "state", device="cuda"))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert metrics["cuda"] == 1.0 and metrics["epsilon"] > 0
    assert read_site(site).spatial_dims == 3


def test_auto_precision_on_a_gpu_is_bf16_and_a_round_trains_with_it(tmp_path):
    """amp=auto on CUDA: bf16 autocast where the GPU supports it (H100/H200/A100), cuDNN autotuning
    on unless the run asks for determinism."""
    from fedseg.common.precision import site_precision

    precision = site_precision("auto", "cuda")
    assert precision.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert torch.backends.cudnn.benchmark
    site_precision("auto", "cuda", deterministic=True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    (site,) = write_study(tmp_path / "study", sites=1, dims=3, cases=6, size=32, seed=0)
    cfg = RunConfig(batch_size=2, channels=(8, 16), patch_size=16, device="cuda")
    reply = client_app(round_message(cfg, ModelSpec(3, 1, 3, (8, 16))),
                       node_context(site, tmp_path / "state", device="cuda"))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["cuda"] == 1.0
    assert {a.dtype for a in reply.content["arrays"].values()} <= {"float32", "int64"}
