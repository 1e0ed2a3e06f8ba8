"""`fedseg export`: the site's model as an ONNX graph that gives the PyTorch model's masks."""

import json

import numpy as np
import pytest
from PIL import Image

from fedseg.client.export import export_onnx
from fedseg.common.cli import main
from fedseg.common.models import ModelSpec
from fedseg.simulations.synth import write_study
from tests.client.test_predict import _run_dir

pytest.importorskip("onnxruntime", reason="the export extra (pip install 'fedseg[export]') is not installed")


@pytest.mark.parametrize("dims", [2, 3])
def test_the_exported_model_predicts_the_same_masks_as_the_pytorch_model(tmp_path, dims, capsys):
    (site,) = write_study(tmp_path / "study", sites=1, dims=dims, cases=2, size=20, seed=0)
    model = _run_dir(tmp_path, ModelSpec(dims, 1, 3, (4, 8), "instance"))
    onnx = tmp_path / "export" / "model.onnx"
    assert main(["export", str(model), "--state-dir", str(tmp_path / "state"), "--output", str(onnx)]) == 0
    assert "with this site's own local layers" in capsys.readouterr().out
    assert sorted(p.name for p in onnx.parent.iterdir()) == ["model.onnx", "model.onnx.json"]  # nothing else
    info = json.loads((tmp_path / "export" / "model.onnx.json").read_text())
    assert info["patch_size"] == [16] * dims and info["model"]["spatial_dims"] == dims and info["local_layers"] == "site"
    # a state dir without local layers of that run: the export says what it holds instead
    assert main(["export", str(model), "--state-dir", str(tmp_path / "other"), "--output",
                 str(tmp_path / "other.onnx")]) == 0
    out = capsys.readouterr().out
    assert "this site's own local layers" not in out and "with initial local layers" in out
    for name, path in (("torch", model), ("onnx", onnx)):
        assert main(["predict", str(site / "images"), str(tmp_path / name), "--model", str(path),
                     "--state-dir", str(tmp_path / "state")]) == 0
    suffix = "*.png" if dims == 2 else "*.nii.gz"
    outputs = sorted((tmp_path / "torch").glob(suffix))
    assert len(outputs) == 2
    for torch_out in outputs:
        onnx_out = tmp_path / "onnx" / torch_out.name
        if dims == 2:
            same = np.asarray(Image.open(torch_out)) == np.asarray(Image.open(onnx_out))
        else:
            import nibabel as nib
            same = np.asarray(nib.load(torch_out).dataobj) == np.asarray(nib.load(onnx_out).dataobj)
        assert same.mean() > 0.999, torch_out.name  # the same masks, up to float rounding at a tie


def test_an_exported_model_cannot_adapt_and_a_missing_description_is_named(tmp_path, capsys):
    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=1, size=20, seed=0)
    model = _run_dir(tmp_path, ModelSpec(2, 1, 2, (4, 8), "instance"))
    onnx = tmp_path / "model.onnx"
    export_onnx(model, None, onnx)
    assert main(["predict", str(site / "images"), str(tmp_path / "out"), "--model", str(onnx), "--adapt"]) != 0
    assert "an exported (ONNX) model is fixed" in capsys.readouterr().err
    (tmp_path / "model.onnx.json").unlink()
    assert main(["predict", str(site / "images"), str(tmp_path / "out"), "--model", str(onnx)]) != 0
    assert "model.onnx.json: the exported model's description is missing" in capsys.readouterr().err


def test_an_int8_export_calibrated_on_the_sites_images_predicts_the_float_models_masks(tmp_path, capsys):
    (site,) = write_study(tmp_path / "study", sites=1, dims=3, cases=2, size=20, seed=0)
    model = _run_dir(tmp_path, ModelSpec(3, 1, 3, (4, 8), "instance"))
    assert main(["export", str(model), "--output", str(tmp_path / "m.onnx"), "--quantize", "int8"]) != 0
    assert "--quantize int8 goes with --calibration-images" in capsys.readouterr().err
    for name, extra in (("float", []), ("int8", ["--quantize", "int8", "--calibration-images", str(site / "images")])):
        assert main(["export", str(model), "--state-dir", str(tmp_path / "state"), "--output",
                     str(tmp_path / f"{name}.onnx"), *extra]) == 0
        assert main(["predict", str(site / "images"), str(tmp_path / name), "--model", str(tmp_path / f"{name}.onnx")]) == 0
    assert "quantized to int8 on 32 patches" in capsys.readouterr().out
    info = json.loads((tmp_path / "int8.onnx.json").read_text())
    assert info["int8"]["label_agreement"] >= 0.98 and "int8" not in json.loads((tmp_path / "float.onnx.json").read_text())
    import nibabel as nib
    import onnx

    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert any(w.data_type == onnx.TensorProto.INT8 for w in graph.initializer)  # int8 weights
    for mask in sorted((tmp_path / "float").glob("*.nii.gz")):
        same = np.asarray(nib.load(mask).dataobj) == np.asarray(nib.load(tmp_path / "int8" / mask.name).dataobj)
        assert same.mean() >= 0.95, mask.name  # untrained weights: near-tied logits, the hardest case for int8
