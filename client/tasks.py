"""One Task per model kind, chosen once from the ModelSpec: the training data, loss, optimizer and
DP step the training loop needs, whole-case inference, and the site's scores.

The ClientApp, ``fedseg predict``, the study and the report's gallery ask ``task_for(spec)``;
none of them knows which kind of model it holds.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import CacheDataset, MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import ResampleToMatch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from fedseg.client.prefetch import ahead_depth, prefetched
from fedseg.client.steps import OpacusStep, PerCaseStep
from fedseg.client.site_cache import cached_dataset
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.models import deep_supervision_weights
from fedseg.common.data import Case, SiteSpec
from fedseg.common.transforms import PatchSize, eval_transforms, roi_size, to_dicts, train_transforms
from fedseg.common.instance_metrics import InstanceScores
from fedseg.common.instances import predict_instances, targets_from_instances
from fedseg.common.maskrcnn import SCORE_THRESHOLD
from fedseg.common.metrics import SegmentationScores


@dataclass(frozen=True)
class Prediction:
    """A whole case's prediction.

    Args:
        labels: (*spatial) integer map: classes (semantic) or instance ids 1..N.
        scores: confidence of instance id i at ``scores[i - 1]`` (instance tasks).
    """

    labels: torch.Tensor
    scores: list[float] | None = None


class Task(ABC):
    """How a site trains, scores and predicts with one kind of model.

    Attributes:
        keep_instances: labels keep instance ids (instance tasks) instead of classes.
        label_dtype: dtype of written label maps.
        grad_clip: non-DP gradient-norm clipping (None: off).
        dp_step: the DP-SGD step class this kind of model needs.
    """

    keep_instances: ClassVar[bool] = False
    label_dtype: ClassVar[type] = np.uint8
    grad_clip: ClassVar[float | None] = None
    dp_step: ClassVar[type] = OpacusStep

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @property
    def dense_logits(self) -> bool:
        """The network scores every pixel: class probabilities to ensemble, explanation maps,
        entropy to adapt on (``ModelKind.dense``)."""
        return self.spec.kind.dense

    @property
    def splits_batch(self) -> bool:
        """A batch's loss is the mean of its patches' losses, each computed on its own (no norm layer
        mixes patches): a step may run the batch in parts (``step_memory.py``)."""
        return False

    def training_data(self, site: SiteSpec, cases: list[Case], patch_size: PatchSize, seed: int,
                      augment: bool = False, cache_mb: int = 0,
                      flips: tuple[int, ...] | None = None) -> Sequence[Any]:
        """Cases decoded once (and, with ``cache_mb``, kept for later rounds in this process);
        indexing one draws a fresh random patch of it, mirrored at random along ``flips`` (None:
        the site's modality decides, ``data.flip_axes``; with ``augment``, also a random
        appearance), the random stream starting from ``seed`` either way."""
        settings = (patch_size, self.keep_instances, augment, flips, site.target_spacing)
        dataset = cached_dataset(site, cases, settings, cache_mb,
                                 # copy_cache=False: the random transforms crop, then compute new
                                 # tensors, and never write to the cached case they crop from
                                 lambda: CacheDataset(to_dicts(cases), cache_rate=1.0, num_workers=0,
                                                      progress=False, copy_cache=False, transform=train_transforms(
                                                          site, patch_size, keep_instances=self.keep_instances,
                                                          augment=augment, flips=flips)))
        dataset.transform.set_random_state(seed=seed)
        return _FirstPatch(dataset)

    def eval_data(self, site: SiteSpec) -> Any:
        """Transform of a whole labeled case (dict item -> image and label)."""
        return eval_transforms(site, keep_instances=self.keep_instances)

    @abstractmethod
    def loss(self, model: nn.Module, items: list[dict[str, Any]], device: str) -> torch.Tensor:
        """Mean training loss of a batch of patches (one per case)."""

    @abstractmethod
    def optimizer(self, model: nn.Module, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
        """The local optimizer."""

    @abstractmethod
    def infer(self, model: nn.Module, image: torch.Tensor, patch_size: PatchSize, device: str,
              like: MetaTensor | None = None) -> Prediction:
        """Predict a whole (C, *spatial) image (the model is in eval mode); with ``like``, on that
        image's grid (``image`` was resampled from it onto the run's spacing)."""

    @abstractmethod
    def new_scores(self, site: SiteSpec, min_group_cases: int) -> Any:
        """An empty accumulator of this task's scores."""

    @abstractmethod
    def add_case(self, scores: Any, prediction: Prediction, data: dict[str, Any], group: str) -> None:
        """Score one case (``data``: the eval transform's output) into ``scores``."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, site: SiteSpec, cases: list[Case], *, patch_size: PatchSize,
                 device: str = "cpu", min_group_cases: int = 5,
                 ensemble: Sequence[nn.Module] = ()) -> dict[str, float]:
        """Score whole cases: Dice/HD95 per label (and PQ/AJI/AP for instances), groups with at
        least ``min_group_cases`` cases; with ``ensemble``, the prediction is the argmax of the
        class probabilities averaged over ``model`` and those models (per-pixel tasks only)."""
        if ensemble and not self.dense_logits:
            raise ValueError(f"a {self.spec.model} model has no per-pixel class probabilities to ensemble")
        members = [m.to(device).eval() for m in (model, *ensemble)]
        scores = self.new_scores(site, min_group_cases)
        transform = self.eval_data(site)
        # the next case is read while this one is scored, where a core is free
        # where the run resamples, the prediction is brought back onto the label's own grid
        native = "label" if site.target_spacing else None
        with contextlib.closing(prefetched(to_dicts(cases), transform, depth=ahead_depth(device))) as ahead:
            for case, data in zip(cases, ahead):
                like = data[native] if native else None
                prediction = (Prediction(self.probabilities(members, data["image"], patch_size, device,
                                                            like=like).argmax(0))
                              if ensemble else self.infer(model, data["image"], patch_size, device, like=like))
                self.add_case(scores, prediction, data, case.group)
        return scores.result()


class SemanticTask(Task):
    """MONAI U-Net or DynUNet: DiceCE on random patches (on each deep-supervision output too,
    weighted), sliding-window inference, Dice/HD95 per label."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.deep_loss_fn = DeepSupervisionLoss(self.loss_fn, weights=deep_supervision_weights(spec))

    @property
    def splits_batch(self) -> bool:
        # Dice (per patch) + cross-entropy (per voxel, equal patches) are means over patches;
        # BatchNorm's statistics are the batch's
        return self.spec.norm != "batch"

    def loss(self, model: nn.Module, items: list[dict[str, Any]], device: str) -> torch.Tensor:
        image = torch.stack([_plain(i["image"]) for i in items]).to(device)
        label = torch.stack([_plain(i["label"]) for i in items]).to(device)
        output = model(image)
        if output.ndim == label.ndim + 1:  # DynUNet training: (batch, outputs, classes, *spatial), all full size
            return self.deep_loss_fn(list(output.unbind(dim=1)), label)
        return self.loss_fn(output, label)

    def optimizer(self, model: nn.Module, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    @torch.no_grad()
    def infer(self, model: nn.Module, image: torch.Tensor, patch_size: PatchSize, device: str,
              like: MetaTensor | None = None) -> Prediction:
        return Prediction(self.probabilities([model], image, patch_size, device, like=like).argmax(dim=0))

    @torch.no_grad()
    def probabilities(self, models: list[nn.Module], image: torch.Tensor, patch_size: PatchSize, device: str,
                      flips: tuple[int, ...] = (), like: MetaTensor | None = None) -> torch.Tensor:
        """Class probabilities (C, *spatial) of a whole image by sliding windows, averaged over
        ``models`` (an ensemble) and over the image mirrored along each spatial axis in ``flips``;
        with ``like``, resampled (linearly, as nnU-Net does) from ``image``'s grid onto ``like``'s."""
        roi = roi_size(patch_size, image.ndim - 1)
        views = [()] + [(axis + 2,) for axis in flips]
        total = torch.zeros(())
        for model in models:
            for axes in views:
                x = image[None].to(device)
                logits = sliding_window_inference(x.flip(axes) if axes else x, roi_size=roi,
                                                  sw_batch_size=4, predictor=model, overlap=0.25)
                probs = logits.softmax(dim=1)
                total = total + (probs.flip(axes) if axes else probs).cpu()
        probs = (total / (len(models) * len(views)))[0]
        if like is None:
            return probs
        return _plain(ResampleToMatch(mode="bilinear")(MetaTensor(_plain(probs), affine=image.affine), img_dst=like))

    def new_scores(self, site: SiteSpec, min_group_cases: int) -> SegmentationScores:
        return SegmentationScores(site.num_classes, min_group_cases)

    def add_case(self, scores: SegmentationScores, prediction: Prediction, data: dict[str, Any],
                 group: str) -> None:
        spacing = _spacing(data["label"], prediction.labels.ndim)  # the label's own, where the image was resampled
        scores.add(prediction.labels[None, None], data["label"][None], spacing, group)


class InstanceTask(Task):
    """torchvision Mask R-CNN: random crops as detection targets, overlapping tiles for whole
    images, PQ/AJI/AP@0.5 plus foreground Dice; exact per-case clipping under DP."""

    keep_instances = True
    label_dtype = np.uint16
    grad_clip = 10.0  # non-DP only: keeps from-scratch Mask R-CNN stable in its first steps
    dp_step = PerCaseStep

    def loss(self, model: nn.Module, items: list[dict[str, Any]], device: str) -> torch.Tensor:
        images = [_plain(i["image"]).to(device) for i in items]
        targets = [{k: v.to(device) for k, v in targets_from_instances(_plain(i["label"][0]).long()).items()}
                   for i in items]
        return sum(model(images, targets).values())

    def optimizer(self, model: nn.Module, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=1e-4)

    @torch.no_grad()
    def infer(self, model: nn.Module, image: torch.Tensor, patch_size: PatchSize, device: str,
              like: MetaTensor | None = None) -> Prediction:
        if like is not None:  # runs plan a spacing for per-pixel networks only
            raise ValueError("Mask R-CNN predicts on each image's own grid; this run resampled it")
        tile = roi_size(patch_size, 2)[0]  # Mask R-CNN's tiles are square
        labels, scores = predict_instances(lambda t: model([t.to(device)])[0], _plain(image),
                                           tile, tile // 4, SCORE_THRESHOLD)
        return Prediction(labels, scores)

    def new_scores(self, site: SiteSpec, min_group_cases: int) -> InstanceScores:
        return InstanceScores(min_group_cases)

    def add_case(self, scores: InstanceScores, prediction: Prediction, data: dict[str, Any],
                 group: str) -> None:
        scores.add(prediction.labels, prediction.scores or [], _plain(data["label"][0]).long(),
                   _spacing(data["image"], 2), group)


def task_for(spec: ModelSpec) -> Task:
    """The task of the spec's model kind, as the registry names it (``model_kinds.KINDS``)."""
    return spec.kind.load("task")(spec)


class _FirstPatch(Sequence):
    """A dataset whose random crop returns a list of one patch, seen as that patch."""

    def __init__(self, dataset: CacheDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        item = self.dataset[index]
        return item[0] if isinstance(item, list) else item


def _spacing(image: torch.Tensor, dims: int) -> tuple[float, ...]:
    pixdim = getattr(image, "pixdim", None)
    return tuple(float(s) for s in pixdim)[:dims] if pixdim is not None else (1.0,) * dims


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor would route every network op through its hooks (and
    keep ``torch.compile`` from tracing the network)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
