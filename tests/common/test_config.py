"""Run-config schema: defaults match pyproject, bad keys and values are named before round 1."""

import sys
from pathlib import Path

import pytest

from fedseg.common.config import ConfigError, RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_defaults_are_the_schema_defaults():
    raw = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_dict(raw) == RunConfig()
    assert set(raw) == set(RunConfig().to_dict())


def test_round_trip_through_kebab_dict():
    cfg = RunConfig(channels=(4, 8, 16), heldout_sites=("site-c",), strategy="fedprox")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("raw, key", [
    ({"strategy": "fedsgd"}, "strategy"),
    ({"lr": -0.1}, "lr"),
    ({"local-layers": "all"}, "local-layers"),
    ({"patch-size": 30, "channels": "8,16,32"}, "patch-size"),  # 30 is not divisible by 4
    ({"num-server-rounds": "three"}, "num-server-rounds"),
    ({"fraction-train": 0}, "fraction-train"),
    ({"dp": "laplace"}, "dp"),
    ({"dp": "sample", "norm": "batch"}, "norm"),
    ({"dp": "sample", "strategy": "fedprox"}, "strategy"),
    ({"dp": "client", "strategy": "fedadam"}, "strategy"),
    ({"model": "maskrcnn", "norm": "batch"}, "norm"),  # 1-4 crops per step: no batch statistics
    ({"model": "unet", "norm": "frozen"}, "norm"),
    ({"model": "maskrcnn", "backbone": "vgg"}, "backbone"),
    ({"model": "maskrcnn", "spatial-dims": 3}, "spatial-dims"),
    ({"compile": True, "dp": "sample"}, "compile"),
    ({"compile": True, "model": "maskrcnn", "norm": "frozen"}, "compile"),
])
def test_bad_value_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_dict(raw)


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="unknown run-config key 'learning-rate'"):
        RunConfig.from_dict({"learning-rate": 0.1})


def test_strings_from_the_command_line_are_coerced():
    cfg = RunConfig.from_dict({"lr": "0.5", "resume": "false", "channels": "4,8", "heldout-sites": "a,b"})
    assert (cfg.lr, cfg.resume, cfg.channels, cfg.heldout_sites) == (0.5, False, (4, 8), ("a", "b"))


def test_cosine_schedule_decays_the_learning_rate_over_the_rounds_a_site_is_told():
    from fedseg.common.models import ModelSpec

    cfg = RunConfig(lr=0.08, lr_schedule="cosine", num_server_rounds=4)
    site = cfg.site_round(ModelSpec(2, 1, 2, (4, 8)), "0123456789abcdef")
    assert [site.round_lr(r) for r in (1, 2, 3, 4)] == pytest.approx([0.08, 0.0683, 0.04, 0.0117], abs=1e-4)
    constant = RunConfig(lr=0.08, num_server_rounds=4).site_round(ModelSpec(2, 1, 2, (4, 8)),
                                                                  "0123456789abcdef")
    assert {constant.round_lr(r) for r in (1, 4)} == {0.08}


def test_a_planned_network_and_its_patch_reach_the_site_through_a_flower_config_record():
    from flwr.app import ConfigRecord

    from fedseg.common.round_config import SiteRoundConfig

    plan = {"spatial_dims": 3, "patch_size": [40, 56, 40], "features": [32, 64, 128, 256],
            "kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}
    cfg = RunConfig(model="auto")
    spec, patch = cfg.network(3, 1, 3, {"3d": plan})
    site = SiteRoundConfig.from_record(ConfigRecord(cfg.site_round(spec, "0123456789abcdef", patch=patch).to_record()))
    assert site.model == spec and site.patch_size == (40, 56, 40)
    assert site.model.kernels[0] == (1, 3, 3) and site.model.strides[1] == (1, 2, 2)
    # model=auto plans channels and patch itself: a patch-size that U-Net's rule refuses is not checked
    assert RunConfig(model="auto", patch_size=30).model == "auto"
