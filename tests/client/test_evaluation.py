"""Fairness groups respect the k-case threshold; test-time adaptation touches only norm statistics."""

import json

import torch

from fedseg.client.adaptation import adapt_norm_statistics, site_images
from fedseg.client.tasks import task_for
from fedseg.common.data import read_site
from fedseg.common.transforms import to_dicts
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
    assert adapt_norm_statistics(model, site_images(spec, list(spec.training)), patch_size=32, seed=0) > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                           for k in changed)
    assert not model.training
    instance = build_model(ModelSpec(2, 1, 3, (8, 16), "instance"))
    assert adapt_norm_statistics(instance, site_images(spec, list(spec.training)), patch_size=32, seed=0) == 0


def test_entropy_adaptation_moves_only_norm_affines_and_lowers_entropy(tmp_path):
    """TENT at an unseen site: no label is read, only the norms' scales and shifts change, and
    the model's per-pixel predictions become more confident on the site's own images."""
    from fedseg.client.adaptation import _patches, adapt_norm_affines

    (site,) = write_study(tmp_path, sites=1, dims=2, cases=3, size=32, shift=1.0, seed=3)
    spec = read_site(site)
    site = site_images(spec, list(spec.training))
    images = torch.cat(list(_patches(site, 32, seed=1, patches_per_case=2)))

    def entropy(model):
        with torch.no_grad():
            probs = model.eval()(images).softmax(dim=1)
            return float(-(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean())

    for norm in ("instance", "group", "batch"):
        torch.manual_seed(0)
        model = build_model(ModelSpec(2, 1, 3, (8, 16), norm))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        start = entropy(model)
        adapt_norm_affines(model, site, patch_size=32, seed=0, steps=20)
        assert entropy(model) < start, norm
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        affines = {f"{n}.{p}" for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.GroupNorm, torch.nn.BatchNorm2d))
                   for p in ("weight", "bias")}
        assert changed and changed <= affines, (norm, changed - affines)
        assert all(p.requires_grad for p in model.parameters())  # training can go on afterwards


def test_an_ensemble_averages_probabilities_before_the_argmax(tmp_path):
    """A model ensembled with itself scores as the model alone; with another model, each pixel
    takes the class of the averaged probabilities (which neither model alone need predict)."""
    (site,) = write_study(tmp_path, sites=1, dims=2, cases=3, size=32, seed=1)
    spec = read_site(site)
    model_spec = ModelSpec(2, 1, 3, (8, 16), "instance")
    task = task_for(model_spec)
    torch.manual_seed(0)
    first, second = build_model(model_spec), build_model(model_spec)
    cases = list(spec.training)
    alone = task.evaluate(first, spec, cases, patch_size=32)
    assert task.evaluate(first, spec, cases, patch_size=32, ensemble=[first]) == alone
    image = task.eval_data(spec)(to_dicts(cases)[:1][0])["image"]
    averaged = (task.probabilities([first], image, 32, "cpu") + task.probabilities([second], image, 32, "cpu")) / 2
    assert torch.allclose(task.probabilities([first, second], image, 32, "cpu"), averaged, atol=1e-6)
    assert task.evaluate(first, spec, cases, patch_size=32, ensemble=[second]) != alone


def test_a_run_on_a_coarser_grid_scores_each_case_in_its_own_geometry(tmp_path):
    """Where a run resamples images to its grid, the prediction comes back onto the label's own
    grid: a network that segments well scores about what it scores on the images' own grid."""
    (site,) = write_study(tmp_path, sites=1, dims=3, cases=3, size=32, num_labels=1, shift=0.0, seed=4)
    own = read_site(site)
    coarse = read_site(site, target_spacing=tuple(1.6 * s for s in json.loads(
        (site / "dataset.json").read_text())["shift"]["spacing"]))
    assert task_for(SPEC_1X1).eval_data(coarse)(to_dicts([own.training[0]])[0])["image"].shape[1] < 32
    threshold = torch.nn.Conv3d(1, 2, 1)  # foreground where the z-scored image is over 2 (objects: ~6)
    with torch.no_grad():
        threshold.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1, 1))
        threshold.bias.copy_(torch.tensor([0.0, -20.0]))
    task = task_for(SPEC_1X1)
    on_own = task.evaluate(threshold, own, list(own.training), patch_size=32)
    on_coarse = task.evaluate(threshold, coarse, list(coarse.training), patch_size=32)
    assert on_own["dice"] > 0.9 and on_coarse["dice"] > 0.85
    assert on_own["dice"] - on_coarse["dice"] < 0.12  # 1.6x coarser loses a little at the small objects' edges
    assert abs(on_own["hd95"] - on_coarse["hd95"]) < 2.0  # both in mm, against the same labels


SPEC_1X1 = ModelSpec(3, 1, 2, (4, 8))
