"""Record-level DP: ledger epsilon vs Opacus' RDP analysis, restarts, refusals, site policy."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from fedseg.client.app import app as client_app
from fedseg.client.privacy import (LEDGER_FILE, DPRound, PrivacyLedger, check_dp_compatible,
                                   plan_round)
from fedseg.client.trainer import train_local
from fedseg.common.config import RunConfig
from fedseg.common.data import read_site
from fedseg.common.models import ModelSpec, build_model, local_keys, split_state
from fedseg.common.records import shared_record
from fedseg.simulations.cli import main
from fedseg.simulations.synth import write_study


def independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Opacus' RDP analysis of the subsampled Gaussian, composed over ``steps`` directly."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma,
                                                              steps=steps, orders=orders), delta=delta)
    return float(eps)


@pytest.fixture()
def site(tmp_path):
    return read_site(write_study(tmp_path / "study", sites=1, dims=2, cases=6, size=32, seed=0)[0])


def _dp_round(site, state_dir: Path, server_round: int, cfg: RunConfig) -> float:
    ledger = PrivacyLedger(state_dir)  # reloaded from disk every round, as after a restart
    plan = plan_round(cfg, len(site.training), ledger)
    model = build_model(ModelSpec(2, 1, 3, (8, 16), "instance"))
    result = train_local(model, site, list(site.training), epochs=cfg.local_epochs,
                         batch_size=cfg.batch_size, lr=0.05, patch_size=32, seed=server_round,
                         dp=(plan, ledger, server_round))
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
    cfg = RunConfig(dp="sample", dp_target_epsilon=4.0, num_server_rounds=3, batch_size=2)
    ledger = PrivacyLedger(tmp_path)
    plan = plan_round(cfg, 6, ledger)
    total = independent_epsilon(plan.sample_rate, plan.noise_multiplier, 3 * plan.steps, cfg.dp_delta)
    assert total == pytest.approx(4.0, abs=0.05)
    assert plan_round(cfg, 6, PrivacyLedger(tmp_path)).noise_multiplier == plan.noise_multiplier


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
def server_identity():
    """Messages are created by a server process; give this one the identity Flower's runtime sets."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _train_message(cfg: RunConfig, server_extra: dict | None = None) -> Message:
    model = build_model(ModelSpec(2, 1, 3, cfg.channels, cfg.norm))
    shared, _ = split_state(model, local_keys(model, cfg.local_layers))
    config = {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in cfg.to_dict().items()}
    config |= {"model-spatial-dims": 2, "model-in-channels": 1, "model-out-channels": 3,
               "server-round": 1, **(server_extra or {})}
    content = RecordDict({"arrays": shared_record(shared, set()), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _node(site_dir: Path, state_dir: Path, **policy) -> Context:
    node_config = {"site-dir": str(site_dir), "state-dir": str(state_dir), **policy}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_site_over_budget_refuses_before_training(site, tmp_path):
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.0, batch_size=2, channels=(8, 16), patch_size=32)
    state = tmp_path / "state"
    # the server "offers" a bigger budget in its config: sites only read their own node config
    reply = client_app(_train_message(cfg, {"max-epsilon": 1000.0}), _node(site.root, state, **{"max-epsilon": 0.5}))
    assert reply.has_error()
    assert "refuses" in reply.error.reason and "max-epsilon 0.500" in reply.error.reason
    assert not (state / "local_layers.pt").exists()  # nothing was trained
    assert json.loads((state / "outbox.jsonl").read_text())["records"] == {}  # no weights left


def test_require_dp_refuses_rounds_without_record_level_dp(site, tmp_path):
    for mode in ("off", "client"):
        cfg = RunConfig(dp=mode, channels=(8, 16), patch_size=32)
        reply = client_app(_train_message(cfg), _node(site.root, tmp_path / mode, **{"require-dp": True}))
        assert reply.has_error() and "requires record-level DP" in reply.error.reason
    weak = RunConfig(dp="sample", dp_noise_multiplier=0.3, batch_size=2, channels=(8, 16), patch_size=32)
    reply = client_app(_train_message(weak), _node(site.root, tmp_path / "w", **{"min-noise-multiplier": 0.8}))
    assert reply.has_error() and "below its minimum" in reply.error.reason
    ok = client_app(_train_message(weak.replace(dp_noise_multiplier=1.0)),
                    _node(site.root, tmp_path / "ok", **{"require-dp": True}))
    assert not ok.has_error() and ok.content["metrics"]["epsilon"] > 0


def test_privacy_command_explains_the_ledger(site, tmp_path, capsys):
    cfg = RunConfig(dp="sample", dp_noise_multiplier=1.0, batch_size=2, local_epochs=1)
    eps = _dp_round(site, tmp_path, 1, cfg)
    assert main(["privacy", str(tmp_path), "--max-epsilon", "20"]) == 0
    out = capsys.readouterr().out
    assert f"epsilon = {eps:.4f}" in out and "delta = 1e-05" in out and f"left {20 - eps:.4f}" in out
    assert main(["privacy", str(tmp_path / "nowhere")]) == 1
