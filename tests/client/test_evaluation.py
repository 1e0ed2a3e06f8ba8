"""Fairness groups respect the k-case threshold; test-time adaptation touches only norm statistics."""

import json

import torch

from fedseg.client.adaptation import adapt_norm_statistics
from fedseg.client.tasks import task_for
from fedseg.common.data import read_site
from fedseg.common.models import ModelSpec, build_model
from fedseg.simulations.synth import write_study


def test_a_group_with_fewer_than_k_cases_is_never_reported(tmp_path):
    (site,) = write_study(tmp_path, sites=1, dims=2, cases=7, size=32, seed=0)
    meta = json.loads((site / "dataset.json").read_text())
    for i, entry in enumerate(meta["training"]):
        entry["group"] = "liver" if i < 5 else "lung"  # 5 liver cases, 2 lung cases
    (site / "dataset.json").write_text(json.dumps(meta))
    spec = read_site(site)
    model_spec = ModelSpec(2, 1, 3, (8, 16), "instance")
    model, task = build_model(model_spec), task_for(model_spec)
    scores = task.evaluate(model, spec, list(spec.training), patch_size=32, min_group_cases=5)
    assert scores["group-cases:liver"] == 5 and 0 <= scores["group-dice:liver"] <= 1
    assert not any("lung" in k for k in scores)
    scores = task.evaluate(model, spec, list(spec.training), patch_size=32, min_group_cases=2)
    assert scores["group-cases:lung"] == 2


def test_norm_adaptation_changes_only_batchnorm_statistics(tmp_path):
    (site,) = write_study(tmp_path, sites=1, dims=2, cases=3, size=32, shift=1.0, seed=3)
    spec = read_site(site)
    model = build_model(ModelSpec(2, 1, 3, (8, 16), "batch"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert adapt_norm_statistics(model, spec, list(spec.training), patch_size=32, seed=0) > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                           for k in changed)
    assert not model.training
    instance = build_model(ModelSpec(2, 1, 3, (8, 16), "instance"))
    assert adapt_norm_statistics(instance, spec, list(spec.training), patch_size=32, seed=0) == 0
