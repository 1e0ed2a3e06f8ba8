"""`fedseg export --format monai-bundle`: a bundle that MONAI's own runner executes on a folder
of NIfTI images with fedseg predict's masks, and whose TorchScript file (MONAI Deploy's) is the
same network."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg.common.cli import main
from fedseg.common.models import ModelSpec
from fedseg.simulations.synth import write_study
from tests.client.test_predict import _run_dir

pytest.importorskip("ignite", reason="the bundle extra (pip install 'fedseg[bundle]') is not installed")


@pytest.mark.parametrize("spacing", [(), (0.7, 0.8, 1.6)], ids=["own-grid", "resampled"])
def test_monai_runs_the_bundle_with_fedseg_predicts_masks_and_its_names(tmp_path, capsys, spacing):
    (site,) = write_study(tmp_path / "study", sites=1, dims=3, cases=2, size=20, seed=0)
    model = _run_dir(tmp_path, ModelSpec(3, 1, 3, (4, 8), "instance"), spacing)
    bundle = tmp_path / "bundle"
    assert main(["export", str(model), "--state-dir", str(tmp_path / "state"), "--format", "monai-bundle",
                 "--output", str(bundle), "--label-names", "anterior,posterior"]) == 0
    assert "this site's own local layers" in capsys.readouterr().out
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "anterior", "2": "posterior"}
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                          "--dataset_dir", str(site / "images"), "--output_dir", str(tmp_path / "monai")],
                         cwd=bundle, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["predict", str(site / "images"), str(tmp_path / "fedseg"), "--model", str(model),
                 "--state-dir", str(tmp_path / "state")]) == 0
    images = sorted((site / "images").glob("*.nii.gz"))
    assert len(images) == 2
    for image in images:
        ours = nib.load(tmp_path / "fedseg" / image.name)
        theirs = nib.load(tmp_path / "monai" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert np.array_equal(np.asarray(theirs.dataobj), np.asarray(ours.dataobj)), image.name
        assert np.allclose(theirs.affine, ours.affine)
        assert ours.shape == nib.load(image).shape and np.allclose(ours.affine, nib.load(image).affine)
    assert len(np.unique(np.asarray(ours.dataobj))) > 1  # not a blank mask: the comparison means something
    scripted, x = torch.jit.load(str(bundle / "models" / "model.ts")), torch.randn(1, 1, 16, 16, 16)
    from monai.networks.nets import UNet
    network = UNet(**{k: v for k, v in json.loads((bundle / "configs" / "inference.json").read_text())[
        "network_def"].items() if k != "_target_"})
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.allclose(scripted(x), network.eval()(x), atol=1e-6)


def test_a_bundle_needs_a_unet_and_as_many_names_as_classes(tmp_path, capsys):
    model = _run_dir(tmp_path, ModelSpec(3, 1, 3, (4, 8), "instance"))
    assert main(["export", str(model), "--format", "monai-bundle", "--output", str(tmp_path / "b"),
                 "--label-names", "only-one"]) != 0
    assert "1 label name(s) given; the model predicts 2 foreground class(es)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
