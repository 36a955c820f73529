"""The distribution ships every package of the source tree: pyproject.toml
lists packages one by one (the repository root is the package), so a new
folder with an ``__init__.py`` must be added there too."""
import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"posttrain_kernels"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in ("tests", "build", ".git") or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts:
            found.add(".".join(("posttrain_kernels", *rel.parts)))
    assert found == listed, f"missing from pyproject.toml: {sorted(found - listed)}; stale: {sorted(listed - found)}"
