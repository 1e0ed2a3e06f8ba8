"""Mask R-CNN under record-level DP: exact per-case clipping, epsilon in the site's ledger, and
the site's own budget, through the real ClientApp with a hospital's node config."""

import json

import pytest
import torch

from fedseg.client.app import app as client_app
from fedseg.client.privacy import LEDGER_FILE
from fedseg.client.steps import private_gradient
from fedseg.common.dp_recipe import DPRound
from fedseg.client.tasks import task_for
from fedseg.common.config import RunConfig
from fedseg.common.data import read_site
from fedseg.common.models import ModelSpec, build_model
from fedseg.simulations.synth import write_study
from tests.client.test_privacy import _server_identity, independent_epsilon  # noqa: F401
from tests.conftest import local_layers_file, node_context, round_message

SIZE = 48


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = write_study(tmp_path_factory.mktemp("inst"), sites=1, cases=4, size=SIZE, task="instance", seed=4)[0]
    return read_site(root)


SPEC = ModelSpec(2, 1, 2, (8, 16), "group", "maskrcnn", "slim", SIZE)


def _model():
    return build_model(SPEC)


def test_each_case_gradient_is_clipped_to_c(site):
    torch.manual_seed(0)
    model = _model().train()
    task = task_for(SPEC)
    params = [p for p in model.parameters() if p.requires_grad]
    data = task.training_data(site, list(site.training), SIZE, seed=0)
    crops = [data[i] for i in range(4)]
    raw = []
    for crop in crops:
        grads = torch.autograd.grad(task.loss(model, [crop], "cpu"), params, allow_unused=True)
        raw.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))))
    c = min(raw) / 4  # every case is over the bound, so every case is clipped
    plan = DPRound(noise_multiplier=0.0, max_grad_norm=c, sample_rate=1.0, steps=1, delta=1e-5)
    losses = (task.loss(model, [crop], "cpu") for crop in crops)
    clipped = private_gradient(params, losses, plan, 1.0, torch.Generator().manual_seed(0))
    assert len(clipped) == 4 and all(n <= c * (1 + 1e-5) for n in clipped)
    assert all(n == pytest.approx(c, rel=1e-4) for n in clipped)
    total = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)))
    assert total <= 4 * c * (1 + 1e-5)  # the sum of four vectors of norm <= C
    # one case, no noise: the update is that case's gradient, rescaled to norm C (same direction)
    torch.manual_seed(1)  # Mask R-CNN samples proposals at random: same draw for both passes
    private_gradient(params, [task.loss(model, crops[:1], "cpu")], plan, 1.0, torch.Generator())
    dp_grad = torch.cat([p.grad.flatten() for p in params]).double()  # float32 norm() is off by 1e-3
    torch.manual_seed(1)
    ref = torch.autograd.grad(task.loss(model, crops[:1], "cpu"), params, allow_unused=True)
    ref = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, ref)]).double()
    assert float(dp_grad.norm()) == pytest.approx(c, rel=1e-4) and float(ref.norm()) > c
    assert float(torch.nn.functional.cosine_similarity(dp_grad, ref, dim=0)) == pytest.approx(1.0, abs=1e-4)


def _train_message(cfg: RunConfig, server_round: int):
    return round_message(cfg, SPEC, server_round)


def test_epsilon_matches_the_accountant_across_restarts_and_the_budget_is_enforced(site, tmp_path):
    cfg = RunConfig(model="maskrcnn", norm="group", patch_size=SIZE, dp="sample", dp_noise_multiplier=1.5,
                    dp_max_grad_norm=1.0, batch_size=1, local_epochs=1, lr=0.01)
    state = tmp_path / "state"
    n_train = 3  # 4 cases, one kept for validation
    q, steps = 1 / n_train, n_train
    budget = (independent_epsilon(q, 1.5, 2 * steps, 1e-5) + independent_epsilon(q, 1.5, 3 * steps, 1e-5)) / 2
    node = node_context(site.root, state, **{"max-epsilon": budget})
    for server_round in (1, 2):  # each call builds everything anew, as a restarted SuperNode would
        reply = client_app(_train_message(cfg, server_round), node)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        expected = independent_epsilon(q, 1.5, server_round * steps, 1e-5)
        assert reply.content["metrics"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    ledger = json.loads((state / LEDGER_FILE).read_text())
    assert ledger["history"] == [[1.5, q, 2 * steps]] and len(ledger["rounds"]) == 2
    saved = local_layers_file(state).read_bytes()
    refused = client_app(_train_message(cfg, 3), node)  # would go over the site's max-epsilon
    assert refused.has_error() and "refuses" in refused.error.reason
    assert json.loads((state / LEDGER_FILE).read_text()) == ledger
    assert local_layers_file(state).read_bytes() == saved  # nothing trained


def test_site_pretrained_weights_fill_its_local_layers_and_a_bad_file_is_refused(site, tmp_path):
    cfg = RunConfig(model="maskrcnn", norm="group", patch_size=SIZE, local_layers="norm", lr=1e-9,
                    batch_size=2, local_epochs=1)
    mine = _model()
    with torch.no_grad():
        for module in mine.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(0.5)
    torch.save(mine.state_dict(), tmp_path / "site-weights.pt")
    state = tmp_path / "state"
    reply = client_app(_train_message(cfg, 1), node_context(site.root, state, **{"pretrained-weights":
                                                                          str(tmp_path / "site-weights.pt")}))
    assert not reply.has_error()
    local = torch.load(local_layers_file(state), weights_only=True)["tensors"]
    norm_weights = [v for k, v in local.items() if k.endswith("weight")]
    assert norm_weights and all(torch.allclose(v, torch.full_like(v, 0.5), atol=1e-4) for v in norm_weights)
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 10)
    bad = client_app(_train_message(cfg, 1), node_context(site.root, tmp_path / "s2", **{"pretrained-weights":
                                                                                str(tmp_path / "broken.pt")}))
    assert bad.has_error() and "broken.pt: not a PyTorch weights file" in bad.error.reason
