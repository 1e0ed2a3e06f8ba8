"""`fedseg predict`: global model + site local layers, NIfTI keeps the input's affine, PNG for 2D."""

import nibabel as nib
import numpy as np
import torch
from flwr.app import ArrayRecord
from PIL import Image

from fedseg.client.site_model import saved_model
from fedseg.client.tasks import task_for
from fedseg.client.state import SiteState
from fedseg.common.models import (ModelSpec, build_model, local_keys, model_signature, split_state,
                                  unseen_norm_set)
from fedseg.server.checkpoints import save_global_model
from fedseg.common.cli import main
from fedseg.common.transforms import image_transforms
from fedseg.simulations.synth import write_study


def _run_dir(tmp_path, spec: ModelSpec, spacing: tuple[float, ...] = ()):
    """A run's global.pt (of a run that resampled images to ``spacing``) and, in a site's state
    dir, that run's local layers."""
    torch.manual_seed(0)
    model = build_model(spec)
    local = local_keys(model, spec, "norm")
    shared, kept = split_state(model, local)
    meta = {"model": spec.to_dict(), "local_layers": "norm", "local_keys": sorted(local),
            "patch_size": 16, "flip_axes": [], "spacing": list(spacing), "run_name": "study", "run_id": "feedface00000000"}
    save_global_model(tmp_path / "run", 1, ArrayRecord(shared), meta)
    signature = model_signature(spec, "norm", kept)
    kept = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in kept.items()}  # the site's own
    SiteState(tmp_path / "state").run("study", "feedface00000000").save_local_layers(kept, 1, signature)
    SiteState(tmp_path / "state").run("other", "0000000000000000").save_local_layers(
        {k: v + 9 for k, v in kept.items()}, 1, signature)  # another federation's: never used here
    return tmp_path / "run" / "model" / "global.pt"


def test_3d_predictions_keep_the_input_affine(tmp_path, capsys):
    (site,) = write_study(tmp_path / "study", sites=1, dims=3, cases=2, size=20, seed=0)
    model = _run_dir(tmp_path, ModelSpec(3, 1, 3, (4, 8), "instance"))
    assert main(["predict", str(site / "images"), str(tmp_path / "out"), "--model", str(model),
                 "--state-dir", str(tmp_path / "state")]) == 0
    assert "2 case(s)" in capsys.readouterr().out
    for src in sorted((site / "images").glob("*.nii.gz")):
        out, inp = nib.load(tmp_path / "out" / src.name), nib.load(src)
        assert out.shape == inp.shape and np.allclose(out.affine, inp.affine)
        assert not np.allclose(inp.affine, np.eye(4))
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}


def test_2d_predictions_are_pngs_of_the_image_shape_and_use_local_layers(tmp_path):
    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=1, size=24, seed=0)
    Image.fromarray(np.zeros((24, 40), np.uint8)).save(site / "images" / "wide.png")
    model = _run_dir(tmp_path, ModelSpec(2, 1, 2, (4, 8), "instance"))
    with_local = saved_model(model, tmp_path / "state").model
    without = saved_model(model, None).model
    norm_key = next(k for k in with_local.state_dict() if ".adn.N." in k)
    mine = without.state_dict()[norm_key] + 0.5  # this run's local layers, not the other run's
    assert torch.equal(with_local.state_dict()[norm_key], mine)
    assert main(["predict", str(site / "images"), str(tmp_path / "out"), "--model", str(model),
                 "--state-dir", str(tmp_path / "state"), "--overlay"]) == 0
    labels = np.asarray(Image.open(tmp_path / "out" / "wide.png"))
    assert labels.shape == (24, 40) and labels.dtype == np.uint8 and labels.max() <= 1  # a label map
    assert np.asarray(Image.open(tmp_path / "out" / "case000.png")).shape == (24, 24)
    overlay = np.asarray(Image.open(tmp_path / "out" / "case000_overlay.png"))
    assert overlay.shape == (240, 240, 3)  # for a person: colour over the image, small ones enlarged
    assert (overlay[::10, ::10] == overlay[9::10, 9::10]).all()  # by whole pixels, nothing blurred


def test_a_file_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"nope")
    (tmp_path / "imgs").mkdir()
    assert main(["predict", str(tmp_path / "imgs"), str(tmp_path / "out"), "--model",
                 str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert "not a fedseg global model" in err and "WARNING: no --state-dir" in err
    assert main(["predict", str(tmp_path / "imgs"), str(tmp_path / "out"), "--model",
                 str(tmp_path / "run" / "model" / "global.pt")]) == 2
    assert "global.pt: not found; a run writes its global model to RUN_DIR/model/global.pt" in capsys.readouterr().err


def test_a_new_site_predicts_with_the_unseen_site_norm_set(tmp_path):
    """A hospital that never trained has no local layers of its own: it gets the norms the
    federation averaged for unseen sites, not untrained (identity) ones."""
    spec = ModelSpec(2, 1, 2, (4, 8), "instance")
    torch.manual_seed(0)
    model = build_model(spec)
    local = local_keys(model, spec, "norm")
    shared, kept = split_state(model, local)
    unseen = {k: v + 0.25 for k, v in unseen_norm_set(model.state_dict(), local).items()}
    meta = {"model": spec.to_dict(), "local_layers": "norm", "local_keys": sorted(local),
            "patch_size": 16, "flip_axes": [], "spacing": [], "run_name": "study", "run_id": "feedface00000000"}
    save_global_model(tmp_path / "run", 1, ArrayRecord({**shared, **unseen}), meta)
    new_site = saved_model(tmp_path / "run" / "model" / "global.pt", tmp_path / "never-trained").model
    for key, value in kept.items():
        if value.is_floating_point():
            assert torch.equal(new_site.state_dict()[key], value + 0.25), key


def test_adapt_fits_the_norms_to_a_new_sites_images_without_changing_the_model_file(tmp_path, capsys):
    """`predict --adapt` at a hospital that never trained: BatchNorm statistics and norm affines
    move to its own unlabeled images, predictions are still written, the model file is untouched."""
    from fedseg.client.predict import adapt_members
    from fedseg.client.tasks import task_for

    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=3, size=24, shift=1.0, seed=4)
    model = _run_dir(tmp_path, ModelSpec(2, 1, 2, (4, 8), "batch"))
    saved = model.read_bytes()
    plain, spec, patch, *_ = saved_model(model, None)
    adapted = saved_model(model, None).model
    images = sorted((site / "images").iterdir())
    adapt_members([adapted], task_for(spec), images, patch, "cpu", model)
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith(".weight") for k in changed)
    assert all(".adn.N." in k for k in changed), changed  # only norm layers move
    assert main(["predict", str(site / "images"), str(tmp_path / "out"), "--model", str(model),
                 "--adapt"]) == 0
    assert "norms adapted to these images" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("*.png"))) == 3 and model.read_bytes() == saved


def test_adapt_on_a_model_it_cannot_change_is_a_clear_error(tmp_path, capsys):
    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=1, size=32, seed=0)
    model = _run_dir(tmp_path, ModelSpec(2, 1, 2, (8, 16), "group", "maskrcnn", "slim", 32))
    assert main(["predict", str(site / "images"), str(tmp_path / "out"), "--model", str(model),
                 "--adapt"]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "--adapt does not apply" in err


def test_test_time_flips_follow_the_axes_the_run_mirrored_its_patches_along(tmp_path):
    """A run that never mirrored its patches (scanner images) is not asked about mirrored images
    when predict estimates uncertainty; a model saved before runs recorded it flips every axis."""
    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=1, size=24, seed=0)
    model = _run_dir(tmp_path, ModelSpec(2, 1, 2, (4, 8), "instance"))
    saved = torch.load(model, weights_only=True)
    maps = {}
    for name, axes in (("none", []), ("all", [0, 1]), ("older", None)):
        variant = tmp_path / name / "global.pt"
        variant.parent.mkdir()
        torch.save({k: v for k, v in saved.items() if k != "flip_axes"} | ({} if axes is None else {"flip_axes": axes}),
                   variant)
        assert main(["predict", str(site / "images"), str(tmp_path / f"out-{name}"), "--model", str(variant),
                     "--state-dir", str(tmp_path / "state"), "--uncertainty"]) == 0
        maps[name] = np.asarray(Image.open(tmp_path / f"out-{name}" / "case000_uncertainty.png"))
    plain = saved_model(model, tmp_path / "state").model
    image = image_transforms(site / "images" / "case000.png")(str(site / "images" / "case000.png"))
    probs = task_for(ModelSpec(2, 1, 2, (4, 8), "instance")).probabilities([plain], image, 16, "cpu")
    entropy = -(probs * probs.clamp_min(1e-8).log()).sum(0)
    assert np.array_equal(maps["none"], (entropy / np.log(2) * 255).clamp(0, 255).numpy().astype(np.uint8))
    assert not np.array_equal(maps["none"], maps["all"]) and np.array_equal(maps["all"], maps["older"])
