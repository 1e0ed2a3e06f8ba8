"""Checkpoints: what rebuilds the model travels with the weights; a damaged newest file falls
back to the previous one, with a warning naming it; an older run folder still resumes."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord

from fedseg.common.config import ConfigError, RunConfig
from fedseg.server.checkpoints import latest_checkpoint, save_checkpoint, save_global_model
from fedseg.server.run_folder import RunFolder, resume_config, resume_overrides

META = {"model": {"spatial_dims": 2}, "local_layers": "norm", "local_keys": ["n.weight"],
        "patch_size": 32, "flip_axes": [], "spacing": [], "run_name": "study", "run_id": "0123456789abcdef"}


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2, 2), value)})


def test_the_newest_readable_checkpoint_is_resumed(tmp_path, caplog):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, _arrays(float(r)), META)
    found, saved = latest_checkpoint(tmp_path)
    assert found == 3 and torch.equal(saved["state_dict"]["w"], torch.full((2, 2), 3.0))
    assert {k: saved[k] for k in META} == META
    (tmp_path / "checkpoints" / "round-3.pt").write_bytes(b"torn by a full disk")
    logger = logging.getLogger("fedseg.server.checkpoints")
    logger.addHandler(caplog.handler)  # the CLI's logging setup stops fedseg's records at its own handler
    try:
        found, saved = latest_checkpoint(tmp_path)
    finally:
        logger.removeHandler(caplog.handler)
    assert found == 2 and torch.equal(saved["state_dict"]["w"], torch.full((2, 2), 2.0))
    assert "round-3.pt is damaged" in caplog.text
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_global_model_refuses_meta_that_could_not_rebuild_the_model(tmp_path):
    path = save_global_model(tmp_path, 5, _arrays(1.0), META)
    assert torch.load(path, weights_only=True)["round"] == 5
    with pytest.raises(ValueError, match="run_id"):
        save_global_model(tmp_path, 5, _arrays(1.0), {k: v for k, v in META.items() if k != "run_id"})


def test_a_run_folder_of_an_earlier_fedseg_resumes_with_its_split(tmp_path):
    # earlier versions kept simulation settings (and two settings since dropped) as run-config keys
    old = {**RunConfig(study_dir="/studies/msd", num_server_rounds=2).to_dict(), "split-site": 4,
           "site-cache-mb": 512, "gpus-per-site": 0.5, "pack-weights": True, "evaluate-in-train": True}
    run_dir = tmp_path / "old-run"
    RunFolder(run_dir).write_run_info({"config": old, "run_id": "0123456789abcdef"})
    cfg = resume_config(run_dir, {"num-server-rounds": 5})
    assert cfg.num_server_rounds == 5 and cfg.resume and cfg.study_dir == "/studies/msd"
    assert RunFolder(run_dir).split_site() == 4
    with pytest.raises(ConfigError, match="cannot change"):
        resume_config(run_dir, {"lr": 0.5})


def test_a_resume_keeps_the_runs_round_timeout_unless_given_another():
    # Flower's run config carries every key: a resume that gives only resume=true carries defaults
    assert resume_overrides(RunConfig(resume=True)) == {}
    assert resume_overrides(RunConfig(resume=True, num_server_rounds=9, round_timeout=60.0)) == {
        "num-server-rounds": 9, "round-timeout": 60.0}
