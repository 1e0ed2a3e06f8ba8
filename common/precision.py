"""Mixed precision and cuDNN autotuning for a site's device: ``amp`` and ``deterministic``."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from fedseg.common.config import AMP_MODES

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a site computes: ``dtype`` None is plain float32 (weights stay float32 either way).

    Args:
        device: the torch device ("cpu", "cuda", "cuda:N").
        dtype: autocast dtype, or None for float32.
    """

    device: str
    dtype: torch.dtype | None = None

    @property
    def device_type(self) -> str:
        return re.sub(r":\d+$", "", self.device)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for forward passes (a no-op in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs its loss scaled so small gradients do not flush to zero; bf16 does not."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units (AVX512-BF16 or AMX), where bf16 autocast trains and infers
    faster than float32 at the same Dice (benchmarks/RESULTS.md, round_profile); elsewhere PyTorch
    emulates bf16, slower than float32."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def site_precision(amp: str, device: str, dp: bool = False, deterministic: bool = False,
                   predict: bool = False) -> Precision:
    """The precision a site trains and evaluates in, and cuDNN's mode for the process.

    ``auto`` is bf16 on a CUDA device that supports it, else fp16 there; on a CPU, bf16 where it
    computes bf16 natively (``cpu_has_bf16``), else float32, except for ``fedseg predict``
    (``predict``), whose masks on a CPU are by default exactly those of the model's float32
    exports (ONNX, MONAI Bundle). Under
    record-level DP (``dp``) training stays float32: per-case clipping in half precision could
    exceed the clipping bound the privacy accounting relies on. cuDNN autotunes its kernels
    (``benchmark``) unless the run asks for bit-exact determinism.

    Raises:
        ValueError: ``amp`` not one of ``AMP_MODES``, or fp16 asked for on a CPU.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"run-config 'amp' = {amp!r}: must be one of {AMP_MODES}")
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    if amp == "fp16" and not cuda:
        raise ValueError("run-config 'amp' = 'fp16' needs a CUDA device (use bf16 on a CPU, or off)")
    asked = amp
    if amp == "auto":
        if cuda:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if cpu_has_bf16() and not predict else "off"
    if dp and amp != "off":
        if asked != "auto":
            log.info("mixed precision is off under dp=sample: per-case gradients are clipped in float32")
        amp = "off"
    return Precision(device, _DTYPES.get(amp))
