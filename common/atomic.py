"""Atomic writes: a crash leaves either the old file or the new one, never half of either."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``; the
    file gets the mode a plain ``open`` would give it (the umask decides who may read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN is written as null)."""
    text = json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) and make it owner-only: a site's state dir holds its ledger
    and local layers, which no other account on the machine may read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _file_mode() -> int:
    """0666 minus the process umask (mkstemp's files are owner-only whatever the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
