"""DICOM in and out. `fedseg ingest DICOM_DIR SITE_DIR`: DICOM series with SEG labels (built from
real Hippocampus MRI) and a real CT file shipped by pydicom become a site folder that passes
`fedseg check --strict`, on the series' own geometry, without a patient identifier; series that
cannot be used are listed with the reason and the rest is ingested. `fedseg predict --format
dicom-seg`: one DICOM SEG per series, named segments, holding exactly fedseg predict's mask."""

import csv
import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fedseg.common.cli import main
from fedseg.common.models import ModelSpec
from tests.client.test_predict import _run_dir
from tests.conftest import SHARED_DATA

pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pip install 'fedseg[dicom]') is not installed")
hd = pytest.importorskip("highdicom", reason="the dicom extra (pip install 'fedseg[dicom]') is not installed")
from tests.client.dicom_series import PATIENT, write_seg, write_series  # noqa: E402

HIPPO = SHARED_DATA / "hippocampus" / "site-msd"


def _hippocampus(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-th training case of the real Hippocampus site (image, labels)."""
    entry = json.loads((HIPPO / "dataset.json").read_text())["training"][n]
    load = lambda key: np.asarray(nib.load(HIPPO / entry[key]).dataobj)  # noqa: E731
    return load("image").astype(np.int16), load("label").astype(np.uint8)


def _world_values(site, entry: str, source: np.ndarray, spacing) -> np.ndarray:
    """The ingested volume's values at the source voxels' positions (LPS on the DICOM side)."""
    image = nib.load(site / entry)
    x, y, z = np.meshgrid(*[np.arange(n) for n in source.shape], indexing="ij")
    ras = np.stack([-x * spacing[0], -y * spacing[1], z * spacing[2], np.ones_like(x)], axis=-1).astype(float)
    index = np.rint(ras @ np.linalg.inv(image.affine).T).astype(int)[..., :3]
    return np.asarray(image.dataobj)[index[..., 0], index[..., 1], index[..., 2]]


def _ingest(pacs, site, capsys) -> tuple[str, dict]:
    """Ingest as a user would: what it printed, and the dataset.json of a folder that passes
    `fedseg check --strict`."""
    assert main(["ingest", str(pacs), str(site)]) == 0
    out = capsys.readouterr().out
    assert main(["check", str(site), "--strict"]) == 0
    return out, json.loads((site / "dataset.json").read_text())


def test_dicom_series_with_seg_become_a_clean_site_folder_and_bad_series_are_named(tmp_path, capsys):
    pacs, spacing = tmp_path / "pacs", (1.0, 1.0, 1.0)
    sources = {}
    for n in (1, 2):
        image, labels = _hippocampus(n)
        series = write_series(pacs / f"study{n}" / "t1", image, spacing)
        write_seg(pacs / f"study{n}" / "seg" / "seg.dcm", series, labels, ["anterior", "posterior"])
        sources[f"study{n}/t1"] = (image, labels)
    unlabeled, _ = _hippocampus(3)
    write_series(pacs / "study3" / "t1", unlabeled, spacing)
    small = unlabeled[:, :, :4]
    write_series(pacs / "scout" / "loc", small, spacing, localizer=True)
    write_series(pacs / "gap" / "t1", small, spacing)
    (pacs / "gap" / "t1" / "IM0002.dcm").unlink()  # a slice missing
    empty = write_series(pacs / "empty" / "t1", small, spacing)
    del empty[1].PixelData
    empty[1].save_as(empty[1].filename, enforce_file_format=True)
    (pacs / "notes.txt").write_text("exported from PACS")

    site = tmp_path / "site-a"
    out, meta = _ingest(pacs, site, capsys)
    assert "3 case(s) ingested (2 labelled, 1 for inference only); 3 series left out:" in out
    assert "(scout/loc): a localizer" in out and "(empty/t1): a file without pixel data" in out
    assert "(gap/t1): its slices do not form one volume (a slice missing" in out
    assert meta["modality"] == "MRI" and meta["spatial_dims"] == 3
    assert meta["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert len(meta["training"]) == 2 and len(meta["test"]) == 1
    mapping = site.with_name("site-a-dicom-ids.csv")
    assert mapping.stat().st_mode & 0o777 == 0o600
    rows = {r["case"]: r for r in csv.DictReader(mapping.open())}
    assert {r["patient_id"] for r in rows.values()} == {PATIENT[1]} and len(rows) == 3
    for entry in meta["training"]:
        image, labels = sources[rows[entry["image"].split("/")[1].split(".")[0]]["folder"]]
        assert np.array_equal(_world_values(site, entry["image"], image, spacing), image)
        assert np.array_equal(_world_values(site, entry["label"], labels, spacing), labels)

    for path in site.rglob("*"):  # names, dataset.json, NIfTI headers and data: nothing identifying
        if path.is_file():
            raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
            text = path.relative_to(site).as_posix().encode() + raw
            assert not any(p.encode() in text for p in (*PATIENT, "DOE", "0042")), path


def test_a_real_ct_file_and_broken_input_are_handled_with_their_reasons(tmp_path, capsys):
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    pacs = tmp_path / "pacs"
    (pacs / "ct").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), pacs / "ct" / "slice.dcm")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = write_series(pacs / "mr" / "t1", np.zeros((8, 8, 3), np.int16), (1.0, 1.0, 1.0))
    write_seg(tmp_path / "elsewhere" / "seg.dcm", series, np.ones((8, 8, 3), np.uint8), ["organ"])
    shutil.move(tmp_path / "elsewhere" / "seg.dcm", pacs / "orphan-seg.dcm")
    shutil.rmtree(pacs / "mr")  # the SEG's series is not there
    for ds in write_series(pacs / "jpeg" / "t1", np.zeros((8, 8, 2), np.int16), (1.0, 1.0, 1.0)):
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # and pixel data no decoder can read
        ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(ds.filename, enforce_file_format=True)
    site = tmp_path / "site-ct"
    out, meta = _ingest(pacs, site, capsys)
    assert "1 case(s) ingested (0 labelled, 1 for inference only)" in out
    assert "orphan-seg.dcm: a SEG of series" in out and "which is not in" in out
    assert "(jpeg/t1): its pixel data cannot be decoded here (transfer syntax JPEG Baseline" in out
    assert meta["modality"] == "CT" and meta["training"] == [] and len(meta["test"]) == 1
    values = np.asarray(nib.load(site / meta["test"][0]).dataobj)
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    assert values.shape == (128, 128, 1) and sorted(np.unique(values)) == sorted(np.unique(hu))

    assert main(["ingest", str(pacs), str(site)]) != 0  # never over an existing site folder
    assert "exists; ingest writes a new site folder" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "elsewhere"), str(tmp_path / "none")]) != 0
    assert "no usable CT or MR series" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_predict_writes_a_dicom_seg_per_series_that_reads_back_as_fedseg_predicts_mask(tmp_path, capsys):
    image, _ = _hippocampus(0)
    series = write_series(tmp_path / "pacs" / "study" / "t1", image, (1.0, 1.0, 1.0))
    write_series(tmp_path / "pacs" / "scout", image[:, :, :2], (1.0, 1.0, 1.0), localizer=True)
    model = _run_dir(tmp_path, ModelSpec(3, 1, 3, (4, 8), "instance"))
    assert main(["predict", str(tmp_path / "pacs"), str(tmp_path / "seg"), "--model", str(model), "--state-dir",
                 str(tmp_path / "state"), "--format", "dicom-seg", "--label-names", "anterior,posterior"]) == 0
    out = capsys.readouterr().out
    assert "1 series segmented; 1 left out:" in out and "a localizer" in out
    seg = hd.seg.segread(tmp_path / "seg" / f"{series[0].SeriesInstanceUID}.seg.dcm")
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["anterior", "posterior"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    # the same model on the same series ingested as NIfTI: the SEG holds exactly that mask
    assert main(["ingest", str(tmp_path / "pacs"), str(tmp_path / "site")]) == 0
    assert main(["predict", str(tmp_path / "site" / "images"), str(tmp_path / "nifti"), "--model", str(model),
                 "--state-dir", str(tmp_path / "state")]) == 0
    (mask_file,) = (tmp_path / "nifti").glob("*.nii.gz")
    volume = hd.get_volume_from_series(series, dtype=np.float32)
    want = hd.Volume.from_nibabel(nib.load(mask_file)).match_geometry(volume).array
    got = seg.get_volume(combine_segments=True, relabel=True).match_geometry(volume).array
    assert np.array_equal(got, want) and len(np.unique(want)) > 1
