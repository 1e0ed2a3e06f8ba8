"""``fedseg export --format monai-bundle``: a site's U-Net (the global weights + its own local
layers) as a MONAI Bundle, the format MONAI Label and MONAI Deploy load, whose
``configs/inference.json`` predicts a folder of NIfTI images as ``fedseg predict`` does: the same
loading and per-channel z-scoring, the same sliding windows (the run's patch, 25% overlap),
softmax, argmax, each mask written with its image's geometry."""

from __future__ import annotations

import platform
import warnings
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from fedseg.client.site_model import saved_model
from fedseg.client.tasks import task_for
from fedseg.common.atomic import atomic_torch_save, atomic_write_json
from fedseg.common.data import DataError
from fedseg.common.models import inference_network, network_definition

SW_BATCH_SIZE, OVERLAP = 4, 0.25  # what fedseg predict's sliding windows use (client/tasks.py)
RUN_NEEDS = "pip install 'fedseg[bundle]' (pytorch-ignite and fire, which MONAI's bundle runner needs)"


def export_bundle(model_path: str | Path, state_dir: str | Path | None, output: str | Path,
                  label_names: list[str] | None = None) -> dict[str, Any]:
    """Write the bundle folder ``output``: ``configs/metadata.json``, ``configs/inference.json``,
    ``models/model.pt`` (state dict) and ``models/model.ts`` (TorchScript, for MONAI Deploy).

    Args:
        label_names: the foreground classes' names, in label order (None: ``label-1``, ...).

    Returns:
        The bundle's metadata.

    Raises:
        DataError: not a U-Net model, an existing non-bundle folder, or label names that do not
            match the model's classes.
    """
    model, spec, patch, _, local_source, spacing = saved_model(model_path, state_dir)
    model, spec = inference_network(model, spec)
    if not task_for(spec).dense_logits:
        raise DataError(f"{model_path}: a MONAI Bundle export covers U-Net models; a {spec.model} model "
                        "(boxes and masks per instance) is not exported")
    names = label_names or [f"label-{i}" for i in range(1, spec.out_channels)]
    if len(names) != spec.out_channels - 1:
        raise DataError(f"{len(names)} label name(s) given; the model predicts {spec.out_channels - 1} "
                        "foreground class(es)")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not (out / "configs" / "metadata.json").is_file():
        raise DataError(f"{out}: exists and is not a bundle; give an empty or new folder")
    metadata = _metadata(spec, patch, names, local_source, spacing)
    (out / "models").mkdir(parents=True, exist_ok=True)
    atomic_torch_save(out / "models" / "model.pt", model.state_dict())
    with warnings.catch_warnings():  # TorchScript is deprecated in PyTorch, and what MONAI Deploy loads
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model.eval())
    staged = out / "models" / "model.ts.partial"
    torch.jit.save(scripted, str(staged))
    staged.replace(out / "models" / "model.ts")
    atomic_write_json(out / "configs" / "inference.json", inference_config(spec, patch, spacing))
    atomic_write_json(out / "configs" / "metadata.json", metadata)
    return metadata


def inference_config(spec: Any, patch: tuple[int, ...], spacing: tuple[float, ...] = ()) -> dict[str, Any]:
    """``configs/inference.json``: ``python -m monai.bundle run --config_file configs/inference.json
    --dataset_dir IMAGES --output_dir OUT`` writes ``OUT/<case>_seg.nii.gz`` for each image, in the
    image's own geometry (where the run resampled to ``spacing``, the prediction is inverted back)."""
    resample = [{"_target_": "Spacingd", "keys": "image", "pixdim": list(spacing), "mode": "bilinear"}] if spacing else []
    invert = [{"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
               "nearest_interp": False, "to_tensor": True}] if spacing else []
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "images",
        "datalist": "$[{'image': p} for p in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))]",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_definition(spec),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True},
            *resample,
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(patch),
                    "sw_batch_size": SW_BATCH_SIZE, "overlap": OVERLAP},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            *invert,
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$np.uint8", "resample": False, "separate_folder": False, "print_log": False},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', False)"],
        "run": ["$@evaluator.run()"],
    }


def _metadata(spec: Any, patch: tuple[int, ...], names: list[str], local_source: str,
              spacing: tuple[float, ...]) -> dict[str, Any]:
    dims = "3D" if spec.spatial_dims == 3 else "2D"
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by fedseg"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"nibabel": _version("nibabel"), "pytorch-ignite": _version("ignite")},
        "required_packages_version": {"nibabel": _version("nibabel"), "pytorch-ignite": _version("ignite")},
        "name": f"fedseg {dims} U-Net",
        "task": f"{dims} semantic segmentation of {', '.join(names)}",
        "description": ("A U-Net trained by federated learning with fedseg: the federation's shared weights "
                        + {"site": "with this site's own local layers",
                           "unseen-site": "with the federation's unseen-site norm set",
                           "initial": "with initial local layers", "": ""}[local_source]
                        + f". Whole images by sliding windows of {'x'.join(map(str, patch))} voxels; images are "
                        "z-scored per channel"
                        + (f", resampled to {' x '.join(f'{s:g}' for s in spacing)} mm and the segmentation back "
                           "to each image's own grid." if spacing else ".")),
        "authors": "fedseg",
        "copyright": "the site that exported it",
        "data_source": "the federation's sites (no image left them)",
        "data_type": "nibabel",
        "intended_use": "research; the hospital validates it before any clinical use",
        "references": [],
        "fedseg": {"patch_size": list(patch), "spacing": list(spacing), "local_layers": local_source,
                   "python": platform.python_version()},
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR/CT", "num_channels": spec.in_channels,
                "spatial_shape": list(patch), "dtype": "float32", "value_range": [],
                "is_patch_data": True, "channel_def": {str(i): f"channel-{i}" for i in range(spec.in_channels)}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": spec.out_channels,
                "spatial_shape": list(patch), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "background", **{str(i): n for i, n in enumerate(names, start=1)}}}},
        },
    }


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return ""
