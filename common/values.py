"""Run-config and round-config values as they arrive (strings from a command line or a TOML file,
numbers and lists from a Flower ConfigRecord) parsed into typed values; kebab-case key names."""

from __future__ import annotations

from typing import Any

from fedseg.common.errors import ConfigError


def kebab(name: str) -> str:
    """``min_train_sites`` -> ``min-train-sites``."""
    return name.replace("_", "-")


def attr(key: str) -> str:
    """``min-train-sites`` -> ``min_train_sites``."""
    return key.replace("-", "_")


def nested_text(value: tuple[tuple[int, ...], ...]) -> str:
    """Per-stage, per-axis sizes as one string (``1x1x1,2x2x2``): a Flower ConfigRecord holds
    flat lists only."""
    return ",".join("x".join(map(str, stage)) for stage in value)


def coerce(key: str, kind: Any, value: Any) -> Any:
    """``value`` as the type ``kind`` names (bool, int, float, str, tuple of int, float or str, tuple of
    int tuples: per stage, sizes per axis, written ``1x1x1,2x2x2`` or as nested lists).

    Raises:
        ConfigError: the value is not of that type; the message names ``key``.
    """
    type_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if type_name == "tuple":
        type_name = str(kind).replace("typing.", "")
    try:
        if type_name == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "str":
            return str(value)
        if type_name == "tuple[int, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) for v in items if str(v).strip())
        if type_name == "tuple[float, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items if str(v).strip())
        if type_name == "tuple[tuple[int, ...], ...]":
            stages = [s.split("x") for s in value.split(",") if s.strip()] if isinstance(value, str) else value
            return tuple(tuple(int(v) for v in stage) for stage in stages)
        if type_name == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"run-config '{key}' = {value!r}: expected {type_name}") from None
    raise ConfigError(f"run-config '{key}': unsupported type {type_name}")
