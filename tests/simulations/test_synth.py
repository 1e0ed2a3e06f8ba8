"""Synthetic studies: contract-valid, per-site shift, real 3D geometry, instance masks."""

import json

import nibabel as nib
import numpy as np
from PIL import Image

from fedseg.common.cli import main
from fedseg.simulations.synth import write_study


def test_3d_sites_have_non_identity_affines_and_their_own_spacing(tmp_path):
    sites = write_study(tmp_path, sites=3, dims=3, cases=1, size=16, shift=1.0, seed=0)
    spacings = []
    for site in sites:
        img = nib.load(site / "images" / "case000.nii.gz")
        lab = nib.load(site / "labels" / "case000.nii.gz")
        assert not np.allclose(img.affine, np.eye(4)) and np.allclose(img.affine, lab.affine)
        spacings.append(tuple(np.round(img.header.get_zooms(), 3)))
        assert set(np.unique(lab.get_fdata())) <= {0.0, 1.0, 2.0}
    assert len(set(spacings)) == 3


def test_sites_at_given_spacings_image_objects_of_one_physical_size(tmp_path):
    """``spacings``: one field of view in mm at every site, sampled at each site's voxel size."""
    sites = write_study(tmp_path, sites=2, dims=3, cases=6, size=30, num_labels=1, spacings=(0.6, 1.5), seed=1)
    volumes = []
    for site, mm in zip(sites, (0.6, 1.5)):
        labels = [nib.load(p) for p in sorted((site / "labels").glob("*.nii.gz"))]
        assert labels[0].shape == (50,) * 3 if mm == 0.6 else labels[0].shape == (20,) * 3
        assert np.allclose(labels[0].header.get_zooms(), mm)
        volumes.append(np.mean([(np.asarray(lab.dataobj) > 0).sum() * mm**3 for lab in labels]))
    assert 0.7 < volumes[0] / volumes[1] < 1.4  # the same physical sizes, within the cases' randomness


def test_shift_changes_intensity_statistics_between_sites(tmp_path):
    def site_means(shift):
        sites = write_study(tmp_path / str(shift), sites=3, dims=2, cases=4, size=32, shift=shift, seed=0)
        return [np.mean([np.asarray(Image.open(p)).mean() for p in (s / "images").glob("*.png")])
                for s in sites]

    assert np.ptp(site_means(1.0)) > 5 * max(np.ptp(site_means(0.0)), 0.5)


def test_instance_task_writes_one_id_per_object(tmp_path):
    (site,) = write_study(tmp_path, sites=1, dims=2, cases=3, size=32, task="instance", seed=0)
    meta = json.loads((site / "dataset.json").read_text())
    assert meta["task"] == "instance" and meta["labels"] == {"0": "background", "1": "object"}
    for entry in meta["training"]:
        ids = np.unique(np.asarray(Image.open(site / entry["label"])))
        assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # ids 1..N, no gaps
        assert len(ids) >= 2


def test_synth_command_output_passes_check(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["synth", str(out), "--sites", "2", "--dims", "3", "--cases", "2", "--size", "16",
                 "--seed", "1"]) == 0
    assert main(["check", str(out / "site-a"), str(out / "site-b")]) == 0
    assert main(["synth", str(out), "--dims", "2", "--shift", "3"]) == 2
