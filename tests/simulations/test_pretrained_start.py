"""A run from pretrained weights: every site scores them as they are before round 1, so the run's
summary and report show what federated training added to (or lost from) the pretrained model; and
training sites start their local layers (FedBN's norms) from the pretrained norms."""

import json

import pytest
import torch

from fedseg.client.tasks import task_for
from fedseg.common.data import read_site, split_training
from fedseg.common.dp_recipe import GOOD_START, NO_WARM_START, RECIPE, WARM_NOISE, warm_lr
from fedseg.client.state import SiteState
from fedseg.common.models import UNSEEN_PREFIX, ModelSpec, build_model, local_keys
from fedseg.common.precision import site_precision
from fedseg.common.weights import load_pretrained
from fedseg.server.report import curve_points, site_table
from fedseg.simulations.pooled import pretrain
from fedseg.simulations.simulate import simulate
from tests.conftest import tiny_config


def test_sites_score_the_pretrained_model_alone_before_round_1(study_2d, tmp_path):
    weights = tmp_path / "public.pt"
    pretrain(study_2d / "site-a", weights, tiny_config(study_2d, tmp_path, local_epochs=3))
    # a learning rate of ~0: after round 1 every site's local layers are still what they started from
    cfg = tiny_config(study_2d, tmp_path / "runs", num_server_rounds=1, pretrained_weights=str(weights),
                      heldout_sites=("site-c",), lr=1e-9)
    run_dir = simulate(cfg, num_cpus=2)

    start = json.loads((run_dir / "summary.json").read_text())["pretrained_alone"]
    assert set(start["sites"]) == {"site-a", "site-b", "site-c"}
    model = build_model(ModelSpec(2, 1, 3, (8, 16), "instance"))
    load_pretrained(model, weights)  # every tensor, the norms included: the model as it was trained
    task = task_for(ModelSpec(2, 1, 3, (8, 16), "instance"))
    for site in ("site-a", "site-b", "site-c"):
        spec = read_site(study_2d / site, seed=cfg.seed)
        with site_precision(cfg.amp, "cpu").autocast():  # as the sites compute
            expected = task.evaluate(model, spec, split_training(spec, cfg.val_fraction, cfg.seed)[1],
                                     patch_size=cfg.patch_size)
        assert start["sites"][site]["dice"] == pytest.approx(expected["dice"], abs=1e-6), site
    assert start["in_federation"]["mean"] == pytest.approx(
        (start["sites"]["site-a"]["dice"] + start["sites"]["site-b"]["dice"]) / 2)
    assert start["heldout_summary"]["mean"] == pytest.approx(start["sites"]["site-c"]["dice"])
    assert "the pretrained model alone (before round 1)" in site_table(run_dir)
    assert "pretrained model alone, in federation" in (run_dir / "report.html").read_text()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    alone = {site: scores["dice"] for site, scores in start["sites"].items()}
    assert curve_points(rounds, "site-a", "eval", "dice", alone)[:2] == [  # the Dice curve starts at round 0
        (0, alone["site-a"]), (1, rounds[0]["eval"]["site-a"]["dice"])]

    info = json.loads((run_dir / "run.json").read_text())
    pretrained = torch.load(weights, weights_only=True)
    norms = local_keys(model, ModelSpec(2, 1, 3, (8, 16), "instance"), "norm")
    for site in ("site-a", "site-b"):  # FedBN's local norms start from the pretrained model's
        run = SiteState(run_dir / "site-state" / site).run(info["config"]["run-name"], info["run_id"])
        saved = torch.load(run.local_layers_path(), weights_only=True)["tensors"]
        assert set(saved) == norms
        for key in norms:
            assert torch.allclose(saved[key], pretrained[key], atol=1e-6), (site, key)


def test_a_run_from_scratch_has_no_pretrained_score(study_2d, tmp_path):
    run_dir = simulate(tiny_config(study_2d, tmp_path, num_server_rounds=1), num_cpus=2)
    assert "pretrained_alone" not in json.loads((run_dir / "summary.json").read_text())


def test_pretrained_weights_that_fail_at_the_sites_train_as_from_scratch(study_2d, tmp_path):
    """A whole U-Net that scores ~0 at the sites (here: one that predicts background everywhere,
    like a model of another distribution) is no warm start: under DP the run keeps no server
    average (the recipe's warm-start setting) and sites start fresh local norms."""
    spec = ModelSpec(2, 1, 3, (8, 16), "instance")
    model = build_model(spec)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([50.0, -50.0, -50.0]))
    torch.save(model.state_dict(), tmp_path / "elsewhere.pt")
    cfg = tiny_config(study_2d, tmp_path / "runs", num_server_rounds=1, dp="sample",
                      dp_noise_multiplier=1.0, pretrained_weights=str(tmp_path / "elsewhere.pt"))
    run_dir = simulate(cfg, num_cpus=2)

    info = json.loads((run_dir / "run.json").read_text())
    assert info["pretrained_alone"]["in_federation"]["mean"] == 0.0
    assert {plan["lr"] for plan in info["dp_plan"].values()} == {RECIPE["lr"]}  # not RECIPE["lr_warm"]
    checkpoint = torch.load(run_dir / "checkpoints" / "round-1.pt", weights_only=False)
    assert checkpoint.get("average_state_dict") is None  # a warm start under DP would keep one
    for site in ("site-a", "site-b", "site-c"):
        outbox = (run_dir / "site-state" / site / "outbox.jsonl").read_text().splitlines()
        trains = [json.loads(line) for line in outbox if json.loads(line)["type"] == "train"]
        assert trains and not any(k.startswith(UNSEEN_PREFIX) for t in trains for k in t["received"]["arrays"])


def test_under_dp_the_sites_step_by_what_the_pretrained_model_scored(study_2d, tmp_path):
    """A weak public model (one pretraining pass) scores between NO_WARM_START and GOOD_START at
    the sites: the run's DP plan and every site's training take the recipe's rate for that score,
    larger than the rate a good public model gets, and the server keeps no moving average."""
    weights = tmp_path / "public.pt"
    pretrain(study_2d / "site-a", weights, tiny_config(study_2d, tmp_path, local_epochs=1))
    cfg = tiny_config(study_2d, tmp_path / "runs", num_server_rounds=1, dp="sample",
                      dp_noise_multiplier=0.5, pretrained_weights=str(weights))
    run_dir = simulate(cfg, num_cpus=2)

    info = json.loads((run_dir / "run.json").read_text())
    start = info["pretrained_alone"]["in_federation"]["mean"]
    assert NO_WARM_START < start < GOOD_START, start  # the premise: a weak but real warm start
    planned = {site: plan["lr"] for site, plan in info["dp_plan"].items()}
    trained = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])["train"]
    assert {site: m["dp-lr"] for site, m in trained.items()} == pytest.approx(planned)
    noise_ratio = {site: min(1.0, WARM_NOISE / plan["noise_to_signal"]) for site, plan in info["dp_plan"].items()}
    assert planned == pytest.approx({s: warm_lr(start) * f for s, f in noise_ratio.items()})
    assert all(lr > RECIPE["lr_warm"] * noise_ratio[s] for s, lr in planned.items())
    checkpoint = torch.load(run_dir / "checkpoints" / "round-1.pt", weights_only=False)
    assert checkpoint.get("average_state_dict") is None  # the average would lag a climbing model
