"""Semi-automatic annotation: predict writes per-case uncertainty maps and pre-annotations,
most uncertain first; uncertainty is higher where the model is wrong."""

import json

import numpy as np
import torch
from flwr.app import ArrayRecord
from PIL import Image
from scipy.stats import spearmanr

from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.cli import main
from fedseg.common.data import read_site
from fedseg.common.models import ModelSpec, build_model, local_keys, split_state
from fedseg.server.checkpoints import save_checkpoint, save_global_model
from fedseg.simulations.synth import write_study

SPEC = ModelSpec(2, 1, 3, (8, 16, 32), "instance")


def test_uncertainty_ranks_the_cases_the_model_gets_wrong_first(tmp_path, capsys):
    home, other = write_study(tmp_path / "study", sites=2, dims=2, cases=16, size=48, shift=1.0, seed=4)
    torch.manual_seed(0)
    model = build_model(SPEC)  # a model that learned at one hospital, used at another
    train_local(model, task_for(SPEC), read_site(home), list(read_site(home).training), epochs=12,
                batch_size=4, lr=0.05, patch_size=32, seed=0)
    shared, _ = split_state(model, local_keys(model, SPEC, "none"))
    meta = {"model": SPEC.to_dict(), "local_layers": "none", "local_keys": [], "patch_size": 32, "flip_axes": [], "spacing": [],
            "run_name": "study", "run_id": "0123456789abcdef"}
    for r in (1, 2):  # the run's last round checkpoints, for an ensemble
        save_checkpoint(tmp_path / "run", r, ArrayRecord(shared), meta)
    model_file = save_global_model(tmp_path / "run", 2, ArrayRecord(shared), meta)
    out = tmp_path / "pred"
    assert main(["predict", str(other / "images"), str(out), "--model", str(model_file), "--state-dir",
                 str(tmp_path / "state"), "--uncertainty", "--pre-annotate", "--last-rounds", "2"]) == 0
    assert "ensemble of 3 models" in capsys.readouterr().out
    fragment = json.loads((out / "pre_annotations.json").read_text())["training"]
    scores = [entry["uncertainty"] for entry in fragment]
    assert len(fragment) == 16 and scores == sorted(scores, reverse=True)  # worst first
    errors, uncertainty = [], []
    for entry in fragment:
        name = entry["label"].rsplit("/", 1)[1]
        truth = np.asarray(Image.open(other / "labels" / name)) > 0
        pred = np.asarray(Image.open(entry["label"])) > 0
        dice = 2 * (truth & pred).sum() / max(truth.sum() + pred.sum(), 1)
        errors.append(1 - dice)
        uncertainty.append(entry["uncertainty"])
        entropy = np.asarray(Image.open(out / name.replace(".png", "_uncertainty.png")))
        assert entropy.shape == truth.shape and entropy.dtype == np.uint8
    rho = spearmanr(uncertainty, errors).statistic
    print(f"rank correlation of per-case uncertainty with Dice error: {rho:.2f}")
    assert rho > 0.3
