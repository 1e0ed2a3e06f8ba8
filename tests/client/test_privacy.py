"""Record-level DP: ledger epsilon vs Opacus' RDP analysis, restarts, refusals, site policy."""

import json
import logging
from pathlib import Path

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from fedseg.client.app import app as client_app
from fedseg.client.privacy import LEDGER_FILE, DPSession, PrivacyLedger
from fedseg.client.site_policy import PolicyRefusal, SitePolicy
from fedseg.client.steps import check_dp_compatible
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.cli import main
from fedseg.common.config import RunConfig
from fedseg.common.round_config import DPSettings
from fedseg.common.dp_recipe import dp_training, plan_round
from fedseg.common.models import ModelSpec, build_model
from tests.conftest import local_layers_file, node_context, round_message

SPEC = ModelSpec(2, 1, 3, (8, 16), "instance")


def independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Opacus' RDP analysis of the subsampled Gaussian, composed over ``steps`` directly."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma,
                                                              steps=steps, orders=orders), delta=delta)
    return float(eps)


def _dp_round(site, state_dir: Path, server_round: int, cfg: RunConfig, run: str = "study-1") -> float:
    # the ledger is reloaded from disk every round, as after a restart
    dp = DPSession.open(cfg.site_round(SPEC, "id").dp, SitePolicy(), state_dir,
                        num_cases=len(site.training), batch_size=cfg.batch_size,
                        epochs=cfg.local_epochs, run=run, server_round=server_round, site=site.name)
    result = train_local(build_model(SPEC), task_for(SPEC), site, list(site.training),
                         epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=0.05, patch_size=32,
                         seed=server_round, dp=dp)
    return result.epsilon


def test_ledger_epsilon_matches_opacus_analysis_and_survives_restarts(site, tmp_path):
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.3, batch_size=2, local_epochs=2, dp_delta=1e-5)
    q, steps_per_round = 2 / 6, 2 * 3  # Poisson rate b/N, epochs * ceil(N/b)
    eps = [_dp_round(site, tmp_path / "state", r, cfg) for r in (1, 2, 3)]
    for r, e in enumerate(eps, start=1):
        assert e == pytest.approx(independent_epsilon(q, 1.3, r * steps_per_round, 1e-5), rel=1e-9)
    assert eps[0] < eps[1] < eps[2]
    ledger = json.loads((tmp_path / "state" / LEDGER_FILE).read_text())
    assert ledger["history"] == [[1.3, q, 3 * steps_per_round]] and len(ledger["rounds"]) == 3


def test_target_epsilon_derives_noise_once_for_all_planned_rounds(site, tmp_path):
    dp = DPSettings("sample", target_epsilon=4.0, planned_rounds=3)
    plan = plan_round(dp, 6, dp_training(dp, 6, batch_size=2, epochs=1))
    total = independent_epsilon(plan.sample_rate, plan.noise_multiplier, 3 * plan.steps, dp.delta)
    assert total == pytest.approx(4.0, abs=0.05)
    cfg = RunConfig(dp="sample", dp_target_epsilon=4.0, num_server_rounds=3, batch_size=2)
    _dp_round(site, tmp_path, 1, cfg, run="study-1")
    assert PrivacyLedger(tmp_path).planned_noise("study-1") == plan.noise_multiplier
    # another run at the same site plans its own noise; the ledger (epsilon) stays site-wide
    other = cfg.replace(dp_target_epsilon=8.0)
    _dp_round(site, tmp_path, 1, other, run="study-2")
    ledger = PrivacyLedger(tmp_path)
    assert ledger.planned_noise("study-2") < ledger.planned_noise("study-1")
    assert [r["run"] for r in ledger.data["rounds"]] == ["study-1", "study-2"]


def test_a_refused_round_writes_nothing_to_the_ledger(site, tmp_path):
    cfg = RunConfig(dp="sample", dp_target_epsilon=4.0, num_server_rounds=3, batch_size=2)
    with pytest.raises(PolicyRefusal, match="over its max-epsilon"):
        DPSession.open(cfg.site_round(SPEC, "id").dp, SitePolicy(max_epsilon=0.1), tmp_path,
                       num_cases=6, batch_size=2, epochs=1, run="r", server_round=1, site="a")
    assert not (tmp_path / LEDGER_FILE).exists()  # not even the planned noise


def test_batchnorm_model_is_rejected_for_dp():
    with pytest.raises(ValueError, match="BatchNorm"):
        check_dp_compatible(build_model(ModelSpec(2, 1, 2, (8, 16), "batch")))
    check_dp_compatible(build_model(ModelSpec(2, 1, 2, (8, 16), "group")))


def test_a_damaged_ledger_stops_training_instead_of_resetting_epsilon(tmp_path):
    (tmp_path / LEDGER_FILE).write_text("{ torn")
    with pytest.raises(RuntimeError, match="privacy ledger unreadable"):
        PrivacyLedger(tmp_path)


# --- the real ClientApp, called the way a SuperNode calls it, with a hospital's node config ---

@pytest.fixture(autouse=True)
def _server_identity(server_identity):
    """Every message here is built as the ServerApp would build it."""


def _train_message(cfg: RunConfig, server_extra: dict | None = None):
    return round_message(cfg, ModelSpec(2, 1, 3, cfg.channels, cfg.norm), extra=server_extra)


def test_site_over_budget_refuses_before_training(site, tmp_path):
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.0, batch_size=2, channels=(8, 16), patch_size=32)
    state = tmp_path / "state"
    # the server "offers" a bigger budget in its config: sites only read their own node config
    reply = client_app(_train_message(cfg, {"max-epsilon": 1000.0}), node_context(site.root, state, **{"max-epsilon": 0.5}))
    assert reply.has_error()
    assert "refuses" in reply.error.reason and "max-epsilon 0.500" in reply.error.reason
    assert local_layers_file(state) is None  # nothing was trained
    assert not (state / LEDGER_FILE).exists()  # nothing was planned into the ledger
    assert json.loads((state / "outbox.jsonl").read_text())["records"] == {}  # no weights left


def test_require_dp_refuses_rounds_without_record_level_dp(site, tmp_path):
    for mode in ("off", "client"):
        cfg = RunConfig(dp=mode, channels=(8, 16), patch_size=32)
        reply = client_app(_train_message(cfg), node_context(site.root, tmp_path / mode, **{"require-dp": True}))
        assert reply.has_error() and "requires record-level DP" in reply.error.reason
    weak = RunConfig(dp="sample", dp_noise_multiplier=0.3, batch_size=2, channels=(8, 16), patch_size=32)
    reply = client_app(_train_message(weak), node_context(site.root, tmp_path / "w", **{"min-noise-multiplier": 0.8}))
    assert reply.has_error() and "below its minimum" in reply.error.reason
    ok = client_app(_train_message(weak.replace(dp_noise_multiplier=1.0)),
                    node_context(site.root, tmp_path / "ok", **{"require-dp": True}))
    assert not ok.has_error() and ok.content["metrics"]["epsilon"] > 0


def test_privacy_command_explains_the_ledger(site, tmp_path, capsys):
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.0, batch_size=2, local_epochs=1)
    eps = _dp_round(site, tmp_path, 1, cfg)
    assert main(["privacy", str(tmp_path), "--max-epsilon", "20"]) == 0
    out = capsys.readouterr().out
    assert f"epsilon = {eps:.4f}" in out and "delta = 1e-05" in out and f"left {20 - eps:.4f}" in out
    assert main(["privacy", str(tmp_path / "nowhere")]) == 1


def test_patches_per_case_do_not_change_epsilon(site, tmp_path):
    """Augmentation multiplicity averages K patches of one case before clipping: the privacy unit
    stays the case, so the accountant sees the same steps, rate and noise."""
    base = RunConfig(dp="sample", dp_noise_multiplier=1.1, batch_size=2, local_epochs=1)
    one = _dp_round(site, tmp_path / "k1", 1, base.replace(dp_patches_per_case=1))
    four = _dp_round(site, tmp_path / "k4", 1, base.replace(dp_patches_per_case=4))
    assert one == four == pytest.approx(independent_epsilon(2 / 6, 1.1, 3, 1e-5), rel=1e-9)
    histories = [json.loads((tmp_path / k / LEDGER_FILE).read_text())["history"] for k in ("k1", "k4")]
    assert histories[0] == histories[1]


def test_each_cases_gradient_is_the_mean_of_its_patches_clipped_to_c(site):
    """Opacus' per-sample gradients, regrouped by case: with no noise the update is the sum over
    cases of clip_C(mean of the case's patch gradients) / expected batch, computed here by hand."""
    from fedseg.client.steps import OpacusStep
    from fedseg.common.dp_recipe import DPRound

    torch.manual_seed(0)
    model, task = build_model(SPEC), task_for(SPEC)
    data = task.training_data(site, list(site.training), 32, seed=0)
    cases = [[data[i] for _ in range(3)] for i in range(4)]  # 4 cases, 3 random patches each
    c = 0.05
    expected = []
    for patches in cases:  # the reference: one case at a time, plain autograd
        grads = torch.autograd.grad(task.loss(model, patches, "cpu"), list(model.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm > c  # so every case is clipped
        expected.append([g * (c / (norm + 1e-6)) for g in grads])
    reference = [sum(parts) / 2.5 for parts in zip(*expected)]
    plan = DPRound(noise_multiplier=0.0, max_grad_norm=c, sample_rate=0.5, steps=1, delta=1e-5)
    step = OpacusStep(task, model, plan, 2.5, torch.Generator().manual_seed(0), "cpu", chunk_cases=3)
    optimizer = step.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    step(cases)  # two chunks (3 + 1 cases), regrouped into 4 per-case gradients
    optimizer.pre_step()  # clip, sum, add the (zero) noise, divide by the expected batch
    step.close()
    for p, ref in zip(model.parameters(), reference):
        assert torch.allclose(p.grad, ref, atol=1e-6, rtol=1e-4)


def test_the_noise_generator_lives_on_the_training_device(site, tmp_path):
    cfg = RunConfig(dp="sample", batch_size=2)
    dp = DPSession.open(cfg.site_round(SPEC, "id").dp, SitePolicy(), tmp_path, num_cases=6,
                        batch_size=2, epochs=1, run="r", server_round=1, site="a")
    model = build_model(SPEC)
    device = str(next(model.parameters()).device)  # the trainer passes the model's device
    step = dp.step(task_for(SPEC).dp_step, task_for(SPEC), model, device, chunk_cases=2)
    assert step.generator.device == next(model.parameters()).device
    step.close()


def test_lr_schedule_scales_the_dp_learning_rate_too(site, tmp_path, caplog):
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.0, dp_lr=0.5, lr_schedule="cosine", num_server_rounds=4,
                    batch_size=2, channels=(8, 16), patch_size=32)
    logger = logging.getLogger("fedseg.client.privacy")
    logger.addHandler(caplog.handler)  # the CLI's logging setup stops fedseg's records at its own handler
    try:
        for server_round in (1, 3):  # cosine over 4 rounds: x1, then x(1 + cos(pi/2)) / 2 = x0.5
            message = round_message(cfg, ModelSpec(2, 1, 3, cfg.channels, cfg.norm), server_round=server_round)
            assert not client_app(message, node_context(site.root, tmp_path / "state")).has_error()
    finally:
        logger.removeHandler(caplog.handler)
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records if "dp=sample" in r.getMessage()))
    assert len(lines) == 2 and "SGD lr 0.5 " in lines[0] and "SGD lr 0.25 " in lines[1]


def test_a_dp_step_takes_no_more_patches_per_forward_pass_than_the_non_private_batch(site, tmp_path):
    """K patches per case: a forward pass takes batch-size / K cases, so memory stays what the
    site's non-private batch needs, whatever K and the expected DP batch."""
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.0, batch_size=2, dp_batch_size=len(site.training),
                    dp_patches_per_case=2, local_epochs=1)
    task, seen = task_for(SPEC), []
    loss = task.loss
    task.loss = lambda model, items, device: seen.append(len(items)) or loss(model, items, device)
    dp = DPSession.open(cfg.site_round(SPEC, "id").dp, SitePolicy(), tmp_path, num_cases=len(site.training),
                        batch_size=cfg.batch_size, epochs=1, run="study-1", server_round=1, site=site.name)
    train_local(build_model(SPEC), task, site, list(site.training), epochs=1, batch_size=2, lr=0.05,
                patch_size=32, seed=1, dp=dp)
    assert seen and max(seen) == 2  # one case of 2 patches at a time, not 2 cases of 2
