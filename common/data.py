"""Site data contract (docs/architecture.md): read dataset.json, validate a site folder, split it."""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import ImageReader, NibabelReader, PILReader
from monai.transforms import LoadImage

from fedseg.common.errors import DataError  # the contract's error, importable without torch

PNG_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
TASKS = ("semantic", "instance")


@dataclass(frozen=True)
class Case:
    """One image/label pair with absolute paths, and its optional fairness group (e.g. organ)."""

    image: Path
    label: Path
    group: str = ""


@dataclass(frozen=True)
class SiteSpec:
    """A site folder's dataset.json, parsed.

    Args:
        name: site name (the folder name, plus ``#k`` for virtual sites).
        root: the site folder.
        spatial_dims: 2 or 3.
        task: ``semantic`` or ``instance`` (instance masks train as foreground).
        labels: label value -> name; instance sites train on {0: background, 1: foreground}.
        training: cases the site may train and validate on.
        test: cases never trained on.
        modality: free text from dataset.json.
        target_spacing: the voxel spacing (mm per axis) a run resamples this site's images to
            for its network (labels nearest-neighbour); empty: each image's own grid.
    """

    name: str
    root: Path
    spatial_dims: int
    task: str
    labels: dict[int, str]
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    modality: str = ""
    target_spacing: tuple[float, ...] = ()

    @property
    def num_classes(self) -> int:
        """Output channels of a semantic model: background + foreground labels."""
        return 2 if self.task == "instance" else max(self.labels) + 1


@dataclass(frozen=True)
class SiteRef:
    """Where a (possibly virtual) site's data lives: ``part`` of ``num_parts`` of a folder."""

    name: str
    site_dir: Path
    part: int = 0
    num_parts: int = 1


def study_sites(study_dir: str | Path, split_site: int = 0) -> list[SiteRef]:
    """Sorted sites of a study folder; with ``split_site=K`` one site becomes K virtual sites.

    Raises:
        DataError: no site folder, or ``split_site`` on a study with several sites.
    """
    study = Path(study_dir)
    if not study.is_dir():
        raise DataError(f"{study}: study folder not found")
    folders = sorted(p for p in study.iterdir() if (p / "dataset.json").is_file())
    if not folders:
        raise DataError(f"{study}: no site folder with a dataset.json inside")
    if split_site > 1:
        if len(folders) != 1:
            raise DataError(
                f"{study}: split-site={split_site} needs a study with one site, found {len(folders)}"
            )
        return [SiteRef(f"{folders[0].name}#{k}", folders[0], k, split_site) for k in range(split_site)]
    return [SiteRef(p.name, p) for p in folders]


def read_site(ref: SiteRef | str | Path, seed: int = 0, target_spacing: tuple[float, ...] = ()) -> SiteSpec:
    """Parse a site's dataset.json (no image is opened; see ``check_site`` for that).

    For a virtual site, its training cases are a seeded, disjoint share of the folder's;
    ``target_spacing``: the grid the run's network sees (``SiteSpec.target_spacing``).

    Raises:
        DataError: dataset.json missing, not JSON, or without the required keys.
    """
    ref = ref if isinstance(ref, SiteRef) else SiteRef(Path(ref).name, Path(ref))
    spec, problems = parse_dataset_json(ref.site_dir)
    if problems:
        raise DataError("\n".join(problems))
    assert spec is not None
    if ref.num_parts > 1:
        order = np.random.RandomState(seed).permutation(len(spec.training))
        share = tuple(spec.training[i] for i in sorted(order[ref.part :: ref.num_parts]))
        spec = SiteSpec(ref.name, spec.root, spec.spatial_dims, spec.task, spec.labels, share,
                        (), spec.modality)
    return dataclasses.replace(spec, target_spacing=tuple(target_spacing)) if target_spacing else spec


def check_site(site_dir: str | Path) -> list[str]:
    """Validate a site folder against the contract; every problem names its file.

    Checks: dataset.json keys, missing/unreadable/corrupt files, paths escaping the site folder,
    duplicate entries, wrong spatial_dims, image/label shape mismatch, undeclared label values,
    NaN/inf, empty dataset. Returns an empty list when the site is clean.
    """
    spec, problems = parse_dataset_json(Path(site_dir))
    if spec is None:
        return problems
    for case in spec.training + spec.test:
        problems.extend(_check_case(spec, case))
    return problems


def split_training(spec: SiteSpec, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic (train, validation) split of a site's training cases.

    A site with one training case validates on it; a site with none (held-out) validates on
    its ``test`` cases and trains on nothing.
    """
    cases = list(spec.training)
    if not cases:
        return [], list(spec.test)
    if len(cases) == 1:
        return cases, cases
    rng = np.random.RandomState(seed + zlib.crc32(spec.name.encode()) % 100_000)
    order = rng.permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def distance_unit(spec: SiteSpec) -> str:
    """The unit of the site's spacing (and HD95): NIfTI voxel spacing is in mm, PNG/JPEG pixels have none."""
    cases = spec.training or spec.test
    return "mm" if cases and cases[0].image.name.lower().endswith(NIFTI_SUFFIXES) else "px"


def image_files(folder: str | Path) -> list[Path]:
    """The PNG/JPEG and NIfTI images of a folder (not its sub-folders), in name order; hidden files
    (a copier's ``._case.nii.gz``) are left out."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.name.lower().endswith(PNG_SUFFIXES + NIFTI_SUFFIXES) and not p.name.startswith("."))


def image_reader(path: Path) -> ImageReader:
    """MONAI reader for a file: PIL in numpy (row, column) order for 2D, nibabel for NIfTI."""
    if path.name.lower().endswith(PNG_SUFFIXES):
        return PILReader(reverse_indexing=False)
    return NibabelReader()


def parse_dataset_json(site_dir: Path) -> tuple[SiteSpec | None, list[str]]:
    """(the site's description, or None if unreadable; the problems found in dataset.json)."""
    path = site_dir / "dataset.json"
    if not path.is_file():
        return None, [f"{path}: missing (every site folder needs a dataset.json)"]
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, [f"{path}: not valid JSON ({err})"]
    if not isinstance(meta, dict):
        return None, [f"{path}: must hold a JSON object"]
    problems = []
    dims = meta.get("spatial_dims", _msd_dims(site_dir, meta))
    if dims not in (2, 3):
        problems.append(f"{path}: 'spatial_dims' must be 2 or 3, got {dims!r}")
    task = meta.get("task", "semantic")
    if task not in TASKS:
        problems.append(f"{path}: 'task' must be one of {TASKS}, got {task!r}")
    labels: dict[int, str] = {}
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        problems.append(f"{path}: 'labels' must be an object like {{\"0\": \"background\", ...}}")
    else:
        for key, name in raw_labels.items():
            if not str(key).isdigit():
                problems.append(f"{path}: label key {key!r} is not a non-negative integer")
            else:
                labels[int(key)] = str(name)
        if labels and 0 not in labels:
            problems.append(f"{path}: 'labels' must declare 0 (background)")
    entries: dict[str, tuple[Case, ...]] = {}
    seen: dict[str, str] = {}
    for split in ("training", "test"):
        raw = meta.get(split, [])
        if not isinstance(raw, list):
            problems.append(f"{path}: '{split}' must be a list")
            raw = []
        cases = []
        for i, item in enumerate(raw):
            where = f"{path}: {split}[{i}]"
            if split == "test" and isinstance(item, str):
                continue  # MSD's unlabeled test images: for inference only, never scored
            if not isinstance(item, dict) or not {"image", "label"} <= set(item):
                problems.append(f"{where}: needs 'image' and 'label'")
                continue
            paths = []
            for key in ("image", "label"):
                resolved, problem = _inside(site_dir, item[key])
                if problem:
                    problems.append(f"{where}: {key} {item[key]!r} {problem}")
                paths.append(resolved)
            if None in paths:
                continue
            if item["image"] in seen:
                problems.append(f"{where}: duplicate entry, image {item['image']!r} is also {seen[item['image']]}")
                continue
            seen[item["image"]] = f"{split}[{i}]"
            group = item.get("group", "")
            if not isinstance(group, str):
                problems.append(f"{where}: 'group' must be a string, got {group!r}")
                continue
            cases.append(Case(paths[0], paths[1], group))
        entries[split] = tuple(cases)
    if not meta.get("training") and not meta.get("test"):
        problems.append(f"{path}: empty dataset: no 'training' and no 'test' entries")
    if problems:
        return None, problems
    modality = meta.get("modality", "")
    if isinstance(modality, dict):  # MSD: {"0": "FLAIR", "1": "T1w", ...}, one per image channel
        modality = ", ".join(str(v) for _, v in sorted(modality.items()))
    spec = SiteSpec(site_dir.name, site_dir, dims, task, labels, entries["training"],
                    entries["test"], str(modality))
    return spec, []


def _msd_dims(site_dir: Path, meta: dict[str, Any]) -> int | None:
    """Spatial dims of a dataset.json that does not declare ``spatial_dims``: MSD's
    ``tensorImageSize`` (``4D`` is 3D with channels), else the first training image's format."""
    size = str(meta.get("tensorImageSize", "")).upper()
    if size in ("2D", "3D", "4D"):
        return min(int(size[0]), 3)
    first = next((item.get("image") for item in meta.get("training", []) if isinstance(item, dict)), None)
    if isinstance(first, str):
        name = first.lower()
        return 2 if name.endswith(PNG_SUFFIXES) else 3 if name.endswith(NIFTI_SUFFIXES) else None
    return None


def _inside(site_dir: Path, rel: Any) -> tuple[Path | None, str]:
    if not isinstance(rel, str) or not rel:
        return None, "is not a path"
    if Path(rel).is_absolute():
        return None, "must be relative to the site folder"
    root = site_dir.resolve()
    resolved = (root / rel).resolve()
    if root != resolved and root not in resolved.parents:
        return None, "escapes the site folder"
    return resolved, ""


def _load(path: Path) -> tuple[np.ndarray | None, str]:
    if not path.is_file():
        return None, f"{path}: missing file"
    if not path.name.lower().endswith(PNG_SUFFIXES + NIFTI_SUFFIXES):
        return None, f"{path}: unsupported format (use .png, .jpg or .nii.gz)"
    try:
        array = LoadImage(reader=image_reader(path), image_only=True)(str(path))
        return np.asarray(array), ""
    except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"{path}: unreadable or corrupt ({reason[:200]})"


def _spatial_shape(array: np.ndarray, dims: int, path: Path) -> tuple[tuple[int, ...] | None, str]:
    if array.ndim == dims:
        return array.shape, ""
    is_png = path.name.lower().endswith(PNG_SUFFIXES)
    if (is_png and dims == 2 and array.ndim == 3 and array.shape[-1] in (3, 4)) or (
            not is_png and dims == 3 and array.ndim == 4):  # channel-last RGB(A) / multi-modal
        return array.shape[:dims], ""
    return None, f"{path}: has shape {array.shape}, dataset.json says spatial_dims={dims}"


def _check_case(spec: SiteSpec, case: Case) -> list[str]:
    problems = []
    image, err = _load(case.image)
    if err:
        problems.append(err)
    label, err = _load(case.label)
    if err:
        problems.append(err)
    if image is None or label is None:
        return problems
    if not np.isfinite(image).all():
        problems.append(f"{case.image}: contains NaN or infinite values")
    image_shape, err = _spatial_shape(image, spec.spatial_dims, case.image)
    if err:
        problems.append(err)
    if label.ndim != spec.spatial_dims:
        problems.append(f"{case.label}: label has shape {label.shape}, dataset.json says "
                        f"spatial_dims={spec.spatial_dims} (labels have one channel)")
        return problems
    if image_shape is not None and tuple(image_shape) != tuple(label.shape):
        problems.append(f"{case.label}: shape {tuple(label.shape)} does not match image "
                        f"{case.image.name} shape {tuple(image_shape)}")
    problems += _geometry_mismatch(case)
    if not np.isfinite(label).all():
        problems.append(f"{case.label}: contains NaN or infinite values")
        return problems
    values = np.unique(label)
    if np.any(values != np.round(values)) or (values.size and values.min() < 0):
        problems.append(f"{case.label}: label values must be non-negative integers")
    elif spec.task == "semantic":
        undeclared = sorted(int(v) for v in values if int(v) not in spec.labels)
        if undeclared:
            problems.append(f"{case.label}: label value(s) {undeclared} not declared in dataset.json "
                            f"labels {sorted(spec.labels)}")
    return problems


def _geometry_mismatch(case: Case) -> list[str]:
    """An image and its label must lie in the same physical space: NIfTI affines (spacing, origin,
    orientation) equal within 1e-3 mm."""
    if not (case.image.name.lower().endswith(NIFTI_SUFFIXES) and case.label.name.lower().endswith(NIFTI_SUFFIXES)):
        return []
    try:
        image, label = nib.load(case.image).affine, nib.load(case.label).affine
    except Exception:  # noqa: BLE001 - unreadable files are reported by _load
        return []
    if np.allclose(image, label, atol=1e-3):
        return []
    what = [name for name, a, b in (("spacing", np.linalg.norm(image[:3, :3], axis=0), np.linalg.norm(label[:3, :3], axis=0)),
                                    ("origin", image[:3, 3], label[:3, 3]),
                                    ("orientation", nib.aff2axcodes(image), nib.aff2axcodes(label)))
            if not np.array_equal(a, b) and (isinstance(a, tuple) or not np.allclose(a, b, atol=1e-3))]
    return [f"{case.label}: {' and '.join(what) or 'affine'} differ(s) from image {case.image} "
            f"(label affine {np.round(label, 3).tolist()}, image affine {np.round(image, 3).tolist()})"]


def case_seed(seed: int, site: str, round_: int) -> int:
    """Seed for one site's work in one round, stable across processes."""
    return (seed * 1_000_003 + round_ * 7919 + zlib.crc32(site.encode())) % (2**31 - 1)

