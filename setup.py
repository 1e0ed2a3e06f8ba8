"""Install the top-level folders as subpackages of ``fedseg`` (docs/architecture.md).

Only the folders that are present are installed: the hospital image copies ``common/`` and
``client/`` alone, so it can never carry the coordinator's code.
"""

from pathlib import Path

from setuptools import setup

FOLDERS = ("common", "client", "server", "simulations")
present = {f"fedseg.{name}": name for name in FOLDERS if any((Path(__file__).parent / name).glob("*.py"))}

setup(packages=list(present), package_dir=present)
