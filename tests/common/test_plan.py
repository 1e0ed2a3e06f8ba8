"""The federated plan: site fingerprints merge into the pooled data's, and the plan made from them
is nnU-Net's."""

import dataclasses
import json

import pytest

from fedseg.common.cli import main
from fedseg.common.data import read_site, study_sites
from fedseg.common.plan import (Fingerprint, make_plan, merge, pool_and_conv, resampling_grid, site_fingerprint,
                               target_spacing)
from fedseg.simulations.synth import write_study
from tests.conftest import SHARED_DATA

HIPPOCAMPUS = SHARED_DATA / "hippocampus"


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="../shared/data not beside the checkout")
def test_hippocampus_split_in_three_sites_plans_what_nnunet_plans_for_the_pooled_data():
    # nnU-Net's plan of the 260 pooled cases (nnunetv2 2.8, nnUNetv2_plan_and_preprocess on MSD Task04),
    # in its (z, y, x) axis order: 3d_fullres at 1 mm, patch 40x56x40, batch 9, 4 stages of 32..256;
    # 2d patch 56x40. fedseg reports axes in the files' (x, y, z) order.
    parts = [site_fingerprint(read_site(ref)) for ref in study_sites(HIPPOCAMPUS, 3)]
    plans = make_plan(merge(parts))
    full, flat = plans["3d"], plans["2d"]
    assert full.spacing == (1.0, 1.0, 1.0)
    assert full.patch_size[::-1] == (40, 56, 40) and full.batch_size == 9
    assert full.features == (32, 64, 128, 256)
    assert full.strides == ((1, 1, 1),) + ((2, 2, 2),) * 3 and all(k == (3, 3, 3) for k in full.kernels)
    assert full.normalization == ("zscore",)
    assert flat.patch_size[::-1] == (56, 40)
    assert resampling_grid(full.to_json(), merge(parts)) == ()  # every case already at 1 mm: none resampled


def test_a_run_resamples_only_where_some_case_lies_off_the_plans_grid(tmp_path):
    apart = [site_fingerprint(read_site(s)) for s in write_study(
        tmp_path / "apart", sites=3, dims=3, cases=2, size=20, spacings=(0.6, 0.9, 1.5), seed=0)]
    plan = make_plan(merge(apart))["3d"]
    assert resampling_grid(plan.to_json(), merge(apart)) == plan.spacing == pytest.approx((0.9,) * 3)  # the median
    alike = [site_fingerprint(read_site(s)) for s in write_study(
        tmp_path / "alike", sites=2, dims=3, cases=2, size=20, spacings=(0.9, 0.9), seed=0)]
    assert resampling_grid(make_plan(merge(alike))["3d"].to_json(), merge(alike)) == ()
    pngs = [site_fingerprint(read_site(s)) for s in write_study(tmp_path / "png", sites=2, dims=2, cases=2, seed=0)]
    assert resampling_grid(make_plan(merge(pngs))["2d"].to_json(), merge(pngs)) == ()  # no spacing in PNGs


def test_merged_site_fingerprints_are_the_pooled_cases_fingerprint(tmp_path):
    write_study(tmp_path, sites=3, dims=3, cases=4, size=24, seed=2)
    sites = [read_site(ref) for ref in study_sites(tmp_path)]
    merged = merge([site_fingerprint(s) for s in sites])
    pooled = site_fingerprint(sites[0], [c for s in sites for c in s.training])
    assert merged.cases == pooled.cases == 12
    assert merged.size == pooled.size and merged.labels == pooled.labels and merged.kept == pooled.kept
    assert merged.intensity == pooled.intensity  # each case's foreground sample is its own
    for ours, theirs in zip(merged.spacing + merged.extent, pooled.spacing + pooled.extent):
        assert ours.keys() == theirs.keys()
        assert all(ours[k] == pytest.approx(theirs[k]) for k in ours)
    assert merged.moments[0] == pytest.approx(pooled.moments[0])
    planned, reference = make_plan(merged), make_plan(pooled)
    assert planned.keys() == reference.keys()
    for name, plan in planned.items():  # the intensity statistics as sums in another order: equal to rounding
        assert dataclasses.replace(plan, intensity=()) == dataclasses.replace(reference[name], intensity=())
        for ours, theirs in zip(plan.intensity, reference[name].intensity, strict=True):
            assert ours == pytest.approx(theirs, rel=1e-12)
    assert Fingerprint.from_json(json.loads(json.dumps(merged.to_json()))) == merged  # survives the wire


def _anisotropic(coarse_size: int) -> Fingerprint:
    """Ten 3D cases: 5 mm slices (three cases at 3 mm), 0.8 mm in-plane."""
    return Fingerprint(
        cases=10, spatial_dims=3, channels=1, modality="MRI",
        spacing=[{0: [3, 9.0], 1: [7, 35.0]}, {0: [10, 8.0]}, {0: [10, 8.0]}],
        size=[{coarse_size: 10}, {256: 10}, {256: 10}],
        extent=[{0: [10, 10.0 * coarse_size * 4.4]}, {0: [10, 2048.0]}, {0: [10, 2048.0]}],
        kept={100: 10}, intensity=[{0: 10}], moments=[[10, 10.0, 20.0]], labels={0: 900, 1: 100})


def test_an_anisotropic_axis_is_planned_at_its_10th_percentile_spacing_only_when_it_has_few_voxels():
    assert target_spacing(_anisotropic(coarse_size=20)) == (3.0, 0.8, 0.8)  # 5 > 3 x 0.8 and 20 x 3 < 256
    assert target_spacing(_anisotropic(coarse_size=200)) == (5.0, 0.8, 0.8)  # as many slices: the median


def test_a_coarse_axis_is_neither_convolved_nor_downsampled_until_the_others_catch_up():
    strides, kernels, patch, divisor = pool_and_conv((3.0, 0.8, 0.8), (20, 160, 160))
    assert kernels[0] == (1, 3, 3) and strides[1] == (1, 2, 2)  # 3 mm is over 2x the 0.8 mm in-plane
    assert kernels[-1] == (3, 3, 3) and any(s[0] == 2 for s in strides)  # once in-plane reaches 1.6 mm
    assert all(p % d == 0 for p, d in zip(patch, divisor))


def test_fedseg_plan_prints_the_plan_writes_plan_json_and_leaves_out_a_site_it_cannot_read(tmp_path, capsys):
    write_study(tmp_path / "study", sites=3, dims=3, cases=4, size=24, seed=1)
    broken = sorted((tmp_path / "study" / "site-c" / "images").iterdir())[0]
    broken.write_bytes(b"not a nifti")
    assert main(["plan", str(tmp_path / "study"), "--output", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert f"site-c: left out of the plan: {broken}" in out
    assert "8 training case(s), 3D" in out and "3d: resampled to" in out and "U-Net of" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert set(saved["configurations"]) == {"3d", "2d"} and saved["fingerprint"]["cases"] == 8
    assert "site-a" not in (tmp_path / "plan.json").read_text()  # no site or file names in the plan


def test_a_site_far_outside_the_federation_is_named_and_the_plan_is_still_made(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    write_study(tmp_path / "study", sites=4, dims=3, cases=3, size=24, seed=4)
    for path in sorted((tmp_path / "study" / "site-b").glob("*/*.nii.gz")):  # 5 mm slices among ~1 mm
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine @ np.diag([1.0, 1.0, 5.0, 1.0])), path)
    for path in sorted((tmp_path / "study" / "site-c" / "images").glob("*.nii.gz")):  # stored x 1000
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32) * 1000 + 5000, img.affine), path)
    assert main(["plan", str(tmp_path / "study"), "--output", str(tmp_path / "plan.json")]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "site site-b: median spacing" in warnings[0] and "site site-c: channel 0" in warnings[1]
    assert (tmp_path / "plan.json").is_file()
