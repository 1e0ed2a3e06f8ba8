"""Site data contract: every kind of bad input is reported with its file; clean sites pass."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import pytest
from monai.transforms import Compose
from PIL import Image

from fedseg.common.data import DataError, check_site, read_site, split_training, study_sites
from fedseg.common.transforms import (base_transforms, eval_transforms, flip_axes, image_channels, to_dicts,
                                     train_transforms)
from fedseg.common.cli import main
from fedseg.common.config import ConfigError, RunConfig
from fedseg.simulations.synth import write_study


@pytest.fixture()
def site2d(tmp_path: Path) -> Path:
    return write_study(tmp_path / "s2", sites=1, dims=2, cases=3, size=32, seed=5)[0]


@pytest.fixture()
def site3d(tmp_path: Path) -> Path:
    return write_study(tmp_path / "s3", sites=1, dims=3, cases=2, size=16, seed=6)[0]


def _meta(site: Path) -> dict:
    return json.loads((site / "dataset.json").read_text())


def _write_meta(site: Path, meta: dict) -> None:
    (site / "dataset.json").write_text(json.dumps(meta))


def _one(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    return hits[0]


@pytest.mark.parametrize("dims, task", [(2, "semantic"), (3, "semantic"), (2, "instance")])
def test_synthetic_sites_pass_the_check(tmp_path, dims, task):
    for site in write_study(tmp_path, sites=2, dims=dims, cases=2, size=16, task=task, seed=1):
        assert check_site(site) == []


def test_missing_file(site2d):
    (site2d / "images" / "case001.png").unlink()
    _one(check_site(site2d), "case001.png", "missing file")


def test_corrupt_png_and_corrupt_nifti(site2d, site3d):
    (site2d / "labels" / "case000.png").write_bytes(b"\x89PNG\r\n garbage")
    _one(check_site(site2d), "labels/case000.png", "corrupt")
    with open(site3d / "images" / "case001.nii.gz", "r+b") as handle:  # truncate the gzip stream
        handle.truncate(200)
    _one(check_site(site3d), "images/case001.nii.gz", "corrupt")


def test_shape_mismatch(site2d):
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(site2d / "labels" / "case002.png")
    _one(check_site(site2d), "case002.png", "does not match")


def test_undeclared_label_value(site2d):
    label = np.zeros((32, 32), np.uint8)
    label[3:6, 3:6] = 7
    Image.fromarray(label).save(site2d / "labels" / "case000.png")
    _one(check_site(site2d), "case000.png", "[7]", "not declared")


def test_nan_in_image(site3d):
    path = site3d / "images" / "case000.nii.gz"
    img = nib.load(path)
    data = img.get_fdata().astype(np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)
    _one(check_site(site3d), "case000.nii.gz", "NaN")


def test_wrong_spatial_dims(site3d):
    meta = _meta(site3d)
    meta["spatial_dims"] = 2
    _write_meta(site3d, meta)
    _one(check_site(site3d), "case000.nii.gz", "spatial_dims=2")


def test_duplicate_entries_and_escaping_paths(site2d):
    meta = _meta(site2d)
    meta["training"].append(dict(meta["training"][0]))
    meta["test"] = [{"image": "../../etc/passwd", "label": "labels/case000.png"},
                    {"image": "/abs/img.png", "label": "labels/case000.png"}]
    _write_meta(site2d, meta)
    problems = check_site(site2d)
    _one(problems, "training[3]", "duplicate")
    _one(problems, "test[0]", "escapes the site folder")
    _one(problems, "test[1]", "must be relative")


def test_empty_dataset_and_missing_or_broken_json(site2d):
    meta = _meta(site2d)
    meta["training"], meta["test"] = [], []
    _write_meta(site2d, meta)
    _one(check_site(site2d), "dataset.json", "empty dataset")
    (site2d / "dataset.json").write_text("{not json")
    _one(check_site(site2d), "dataset.json", "not valid JSON")
    (site2d / "dataset.json").unlink()
    _one(check_site(site2d), "dataset.json", "missing")


def test_check_command_exit_codes(site2d, capsys):
    assert main(["check", str(site2d)]) == 0
    assert "OK" in capsys.readouterr().out
    (site2d / "images" / "case000.png").unlink()
    assert main(["check", str(site2d)]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and "case000.png" in out


def test_png_loads_in_row_column_order_for_image_and_label(tmp_path):
    site = write_study(tmp_path, sites=1, dims=2, cases=1, size=16, seed=0)[0]
    image = np.zeros((20, 36), np.uint8)
    image[0, :] = 255  # first row bright
    label = np.zeros((20, 36), np.uint8)
    label[0, :] = 1
    Image.fromarray(image).save(site / "images" / "case000.png")
    Image.fromarray(label).save(site / "labels" / "case000.png")
    spec = read_site(site)
    data = eval_transforms(spec)(to_dicts([spec.training[0]])[0])
    assert data["image"].shape == (1, 20, 36) and data["label"].shape == (1, 20, 36)
    assert data["label"][0, 0].all() and data["image"][0, 0].min() > data["image"][0, 1:].max()


def test_split_is_deterministic_and_disjoint(study_2d):
    spec = read_site(study_sites(study_2d)[0])
    train, val = split_training(spec, 0.34, seed=4)
    assert (train, val) == split_training(spec, 0.34, seed=4)
    assert not set(train) & set(val) and len(train) + len(val) == len(spec.training) and len(val) == 2


def test_virtual_sites_partition_one_site(tmp_path):
    study = tmp_path / "one"
    write_study(study, sites=1, dims=2, cases=7, size=16, seed=0)
    refs = study_sites(study, split_site=3)
    parts = [set(read_site(r, seed=1).training) for r in refs]
    assert [r.name for r in refs] == ["site-a#0", "site-a#1", "site-a#2"]
    assert sum(map(len, parts)) == 7 and not (parts[0] & parts[1] or parts[1] & parts[2] or parts[0] & parts[2])
    with pytest.raises(DataError, match="one site"):
        study_sites(write_study(tmp_path / "two", sites=2, cases=1, size=16)[0].parent, split_site=2)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[3] / "shared" / "data" / "monuseg").is_dir(),
                    reason="../shared/data not beside the checkout")
def test_real_monuseg_and_hippocampus_sites_pass_the_check(tmp_path):
    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    assert check_site(data / "monuseg" / "site2-kidney") == []
    hippo = tmp_path / "hippo"
    shutil.copytree(data / "hippocampus" / "site-msd", hippo, ignore=shutil.ignore_patterns("*.nii.gz"))
    meta = _meta(hippo)
    meta["training"] = meta["training"][:3]
    _write_meta(hippo, meta)
    for entry in meta["training"]:  # three real volumes are enough
        for key in ("image", "label"):
            shutil.copy(data / "hippocampus" / "site-msd" / entry[key], hippo / entry[key])
    assert check_site(hippo) == []


def test_check_warns_about_text_that_may_identify_a_patient(tmp_path, capsys):
    (site,) = write_study(tmp_path / "study", sites=1, dims=3, cases=2, size=16, seed=0)
    meta = json.loads((site / "dataset.json").read_text())
    entry = meta["training"][0]
    renamed = entry["image"].replace("case000", "SMITH^JOHN_19550101")
    shutil.move(site / entry["image"], site / renamed)
    entry["image"] = renamed
    (site / "dataset.json").write_text(json.dumps(meta))
    label = nib.load(site / entry["label"])
    label.header["descrip"] = b"Smith John MRN 12345"
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine, label.header), site / entry["label"])
    assert main(["check", str(tmp_path / "study")]) == 0  # a warning by default: the contract holds
    out = capsys.readouterr().out
    assert "is a study folder: checking its 1 site(s)" in out
    assert "SMITH^JOHN_19550101.nii.gz: file name looks like it holds a date" in out
    assert "NIfTI header descrip = 'Smith John MRN 12345'" in out
    assert main(["check", "--strict", str(site)]) == 1
    assert main(["check", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: not found" in capsys.readouterr().err


def _msd_task(root: Path, channels: int) -> Path:
    """An MSD task folder as the Decathlon ships it: imagesTr/labelsTr, tensorImageSize, a
    modality dict, unlabeled test images as plain paths, no spatial_dims."""
    rng = np.random.RandomState(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    training = []
    for i in range(4):
        label = np.zeros((20, 20, 16), np.uint8)
        label[6:14, 6:14, 4:12] = 1 + i % 2
        shape = (20, 20, 16, channels) if channels > 1 else (20, 20, 16)
        image = rng.rand(*shape).astype(np.float32)
        affine = np.diag([1.2, 1.2, 2.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTs" / "case_9.nii.gz")
    modality = {str(c): name for c, name in enumerate(["FLAIR", "T1w", "t1gd", "T2w"][:channels])}
    (root / "dataset.json").write_text(json.dumps({
        "name": "Task", "tensorImageSize": "4D" if channels > 1 else "3D", "modality": modality,
        "labels": {"0": "background", "1": "a", "2": "b"}, "numTraining": 4, "numTest": 1,
        "training": training, "test": ["./imagesTs/case_9.nii.gz"]}))
    return root


def test_an_msd_task_folder_is_a_site_as_it_comes(tmp_path):
    for channels in (1, 4):  # Hippocampus-like, and BraTS-like four MRI channels in one 4D file
        site = _msd_task(tmp_path / f"task{channels}", channels)
        assert check_site(site) == []
        spec = read_site(site)
        assert spec.spatial_dims == 3 and len(spec.training) == 4 and spec.test == ()
        assert image_channels(spec) == channels
        data = eval_transforms(spec)({"image": str(spec.training[0].image), "label": str(spec.training[0].label)})
        assert tuple(data["image"].shape) == (channels, 20, 20, 16) and tuple(data["label"].shape) == (1, 20, 20, 16)
    assert spec.modality == "FLAIR, T1w, t1gd, T2w"


def test_check_finds_an_image_and_label_in_different_physical_spaces(tmp_path):
    site = _msd_task(tmp_path / "task", 1)
    label = nib.load(site / "labelsTr" / "case_2.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), np.diag([1.0, 1.2, 2.0, 1.0])),
             site / "labelsTr" / "case_2.nii.gz")
    (problem,) = check_site(site)
    assert "labelsTr/case_2.nii.gz: spacing differ(s) from image" in problem
    assert "imagesTr/case_2.nii.gz" in problem


def test_augmentation_changes_only_the_image_and_keeps_the_label(tmp_path):
    (site,) = write_study(tmp_path, sites=1, dims=3, cases=2, size=24, seed=0)
    spec = read_site(site)
    item = to_dicts(list(spec.training))[0]
    plain, augmented = (train_transforms(spec, 16, augment=a) for a in (False, True))
    for transform in (plain, augmented):
        transform.set_random_state(seed=3)
    a, b = plain(item)[0], augmented(item)[0]
    assert torch.equal(a["label"], b["label"])  # the same crop and flips
    assert not torch.equal(a["image"], b["image"])  # another appearance


def test_histology_tiles_are_mirrored_and_scanner_images_keep_their_orientation():
    assert flip_axes("auto", 2, ["histopathology (H&E, RGB brightfield)"]) == (0, 1)
    assert flip_axes("auto", 2, ["synthetic"]) == (0, 1)
    assert flip_axes("auto", 3, ["MRI (T1-weighted)"]) == ()  # anterior stays anterior
    assert flip_axes("auto", 3, ["synthetic"]) == ()  # a volume keeps the patient's orientation
    assert flip_axes("auto", 2, ["chest X-ray"]) == flip_axes("auto", 2, ["FLAIR, T1w, t1gd, T2w"]) == ()
    assert flip_axes("auto", 2, ["H&E", "CT"]) == ()  # one scanner site is enough to keep orientation
    assert flip_axes("all", 3, ["MRI"]) == (0, 1, 2)
    assert flip_axes("2,0", 3, ["MRI"]) == (0, 2)
    with pytest.raises(ConfigError, match="'flips' = '2': the images are 2D"):
        flip_axes("2", 2, ["H&E"])
    with pytest.raises(ConfigError, match="run-config 'flips' = 'sideways'"):
        RunConfig(flips="sideways")


def test_training_patches_are_mirrored_only_along_the_flip_axes(tmp_path):
    (site,) = write_study(tmp_path, sites=1, dims=3, cases=1, size=24, seed=0)
    spec = read_site(site)
    item = to_dicts(list(spec.training))[0]
    # a 24-voxel patch of a 24^3 case is the whole case, as the site keeps it (float16)
    whole = eval_transforms(spec)(item)["image"].half().float()
    seen: dict[tuple[int, ...], set[str]] = {}
    for flips in ((), (1,)):
        transform = train_transforms(spec, 24, flips=flips)
        for seed in range(8):
            transform.set_random_state(seed=seed)
            patch = transform(item)[0]["image"]
            seen.setdefault(flips, set()).add(
                "plain" if torch.equal(patch, whole) else "mirrored" if torch.equal(patch, whole.flip(2)) else "other")
    assert seen == {(): {"plain"}, (1,): {"plain", "mirrored"}}


def test_a_run_grid_resamples_training_patches_and_keeps_evaluation_labels_in_their_own(tmp_path):
    (site,) = write_study(tmp_path, sites=1, dims=3, cases=1, size=30, num_labels=2, spacings=(0.6,), seed=0)
    spec = read_site(site, target_spacing=(1.2, 1.2, 1.2))
    item = to_dicts([spec.training[0]])[0]
    whole = Compose(base_transforms(spec))(item)  # what training crops from: both on the run's grid
    half = tuple(whole["image"].shape[1:])  # 50 voxels of 0.6 mm: about 25 of 1.2 mm
    assert half == tuple(whole["label"].shape[1:]) and all(abs(n - 25) <= 1 for n in half)
    assert set(whole["label"].unique().tolist()) <= {0, 1, 2}  # nearest-neighbour: only declared labels
    evaluated = eval_transforms(spec)(item)
    assert tuple(evaluated["image"].shape[1:]) == half and evaluated["label"].shape[1:] == (50, 50, 50)
    assert train_transforms(spec, 16)(item)[0]["label"].shape[1:] == (16, 16, 16)
