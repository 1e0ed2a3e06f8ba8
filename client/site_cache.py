"""Decoded training cases kept across rounds within one process, under a byte budget.

In simulation a Ray worker serves many rounds (and virtual sites), so each round need not read and
decode the same files again. A deployed SuperNode starts a fresh process for every message, where
this cache is simply empty each time. Entries are keyed by everything that decides the cached
content (the files' sizes and modification times, dataset.json, the transform settings), so a
corrected label or an edited dataset.json is read again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset

from fedseg.common.data import Case, SiteSpec

log = logging.getLogger(__name__)
_entries: OrderedDict[Hashable, tuple[CacheDataset, int]] = OrderedDict()


def cached_dataset(site: SiteSpec, cases: list[Case], settings: tuple, budget_mb: int,
                   build: Callable[[], CacheDataset]) -> CacheDataset:
    """``build()``'s dataset, or the one this process built before for the same site, cases,
    files and ``settings``; least recently used entries are dropped beyond ``budget_mb`` MiB in
    all (0: never keep anything)."""
    if budget_mb <= 0:
        return build()
    key = (site.name, _stat(site.root / "dataset.json"), settings,
           tuple((_stat(c.image), _stat(c.label)) for c in cases))
    if key in _entries:
        _entries.move_to_end(key)
        return _entries[key][0]
    dataset = build()
    size = sum(_nbytes(item) for item in getattr(dataset, "_cache", []))
    budget = budget_mb * 2**20
    if size <= budget:
        _entries[key] = (dataset, size)
        while sum(n for _, n in _entries.values()) > budget:
            _entries.popitem(last=False)
    else:
        log.info("site %s: %.0f MiB of decoded cases exceed the site cache (--site-cache-mb %d); reading from disk each round",
                 site.name, size / 2**20, budget_mb)
    return dataset


def cached_bytes() -> int:
    """Bytes of decoded cases this process holds."""
    return sum(n for _, n in _entries.values())


def _stat(path: Path) -> tuple[str, int, int]:
    info = path.stat()
    return str(path), info.st_size, info.st_mtime_ns


def _nbytes(item: Any) -> int:
    if isinstance(item, torch.Tensor):
        return item.element_size() * item.nelement()
    if isinstance(item, dict):
        return sum(_nbytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(_nbytes(v) for v in item)
    return 0
