"""Every script in benchmarks/ starts: its imports resolve against the code as it is now (a
benchmark that breaks with a refactor would otherwise only fail when someone next measures)."""

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                 if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports_and_has_an_entry_point(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"
