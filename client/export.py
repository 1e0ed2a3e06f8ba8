"""``fedseg export``: a site's model (the global weights + its own local layers) as an ONNX graph
that runs without fedseg or PyTorch (ONNX Runtime, or the hospital's own inference platform),
checked against the PyTorch model before it is written; and ``OnnxNetwork``, through which
``fedseg predict`` runs such a file with MONAI's sliding windows as before."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedseg.client.quantize import calibration_patches, quantize_int8
from fedseg.client.site_model import SavedModel, recorded_flip_axes, recorded_patch, recorded_spacing, saved_model
from fedseg.client.tasks import task_for
from fedseg.common.atomic import atomic_write_json
from fedseg.common.models import inference_network
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.data import DataError

SIDECAR = ".json"  # model.onnx.json: what rebuilds the sliding windows (spec, patch size) + the check
MAX_ABS_DIFF = 1e-3  # logits of the exported graph vs PyTorch's on the check batch
INSTALL = "pip install 'fedseg[export]' (onnx, onnxscript, onnxruntime)"


def export_onnx(model_path: str | Path, state_dir: str | Path | None, output: str | Path,
                calibration_images: str | Path | None = None) -> dict[str, Any]:
    """Write ``output`` (ONNX, batch axis dynamic) and ``output.json`` for a fedseg U-Net model.

    The graph is run by ONNX Runtime on a random batch of another size than the one it was
    traced with, and written only if its logits match PyTorch's within ``MAX_ABS_DIFF``. With
    ``calibration_images`` (the site's own unlabeled images) the file written is that graph
    quantized to int8 (``quantize.quantize_int8``), checked against it in turn.

    Returns:
        The sidecar's content (model spec, patch size, the check's figures).

    Raises:
        DataError: not a U-Net model, or the export packages are not installed.
        RuntimeError: the exported graph disagrees with the PyTorch model (nothing written).
    """
    model, spec, patch, flips, local_source, spacing = saved_model(model_path, state_dir)
    model, spec = inference_network(model, spec)
    if not task_for(spec).dense_logits:
        raise DataError(f"{model_path}: fedseg export covers U-Net models; a {spec.model} model "
                        "(boxes and masks per instance) is not exported")
    ort = _onnxruntime()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = output.with_name(output.name + ".partial")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, spec.in_channels, *patch, generator=generator)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every pass
            torch.onnx.export(model, (example,), staged, dynamo=True, external_data=False,  # one file
                              input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    except ImportError as err:
        raise DataError(f"exporting needs the ONNX packages ({err}): {INSTALL}") from None
    check = torch.randn(3, *example.shape[1:], generator=generator)
    with torch.no_grad():
        expected = model(check)
    got = torch.from_numpy(ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
                           .run(None, {"image": check.numpy()})[0])
    diff = float((got - expected).abs().max())
    agreement = float((got.argmax(1) == expected.argmax(1)).float().mean())
    if not diff <= MAX_ABS_DIFF:
        staged.unlink()
        raise RuntimeError(f"{model_path}: the exported graph's logits differ from the PyTorch model's "
                           f"by up to {diff:.3g} (allowed {MAX_ABS_DIFF:g}); nothing written")
    info = {"format": "onnx", "model": spec.to_dict(), "patch_size": list(patch),
            "flip_axes": list(flips), "spacing": list(spacing), "source": str(model_path),
            "local_layers": local_source, "check": {"max_abs_diff": diff, "label_agreement": agreement},
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__}}
    if calibration_images is not None:
        try:
            patches = calibration_patches(calibration_images, spec.in_channels, patch, spec.spatial_dims,
                                          spacing=spacing)
            info["int8"] = quantize_int8(staged, output, patches)
        finally:
            staged.unlink(missing_ok=True)
    else:
        os.replace(staged, output)
    atomic_write_json(Path(str(output) + SIDECAR), info)
    return info


class OnnxNetwork(nn.Module):
    """An exported fedseg U-Net as a module: logits of an image batch by ONNX Runtime on the CPU
    (what MONAI's sliding-window inference calls it with)."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ONNX Runtime raises its own types
            raise DataError(f"{path}: not a readable ONNX model ({err})") from None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch = image.detach().as_subclass(torch.Tensor).float().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {"image": batch})[0]).to(image.device)


def exported_model(path: str | Path) -> SavedModel:
    """An exported model (its network, spec, patch size, flip axes and grid), from the file and its
    ``.json`` sidecar.

    Raises:
        DataError: the sidecar is missing or unreadable, or the file is not ONNX.
    """
    sidecar = Path(str(path) + SIDECAR)
    try:
        info = json.loads(sidecar.read_text())
        spec = ModelSpec.from_dict(info["model"])
        patch = recorded_patch(info, spec)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{sidecar}: the exported model's description is missing or damaged ({err}); "
                        "export it again with `fedseg export`") from None
    return SavedModel(OnnxNetwork(path), spec, patch, recorded_flip_axes(info, spec), spacing=recorded_spacing(info))


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise DataError(f"exported models need ONNX Runtime: {INSTALL}") from None
    return onnxruntime
