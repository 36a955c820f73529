"""The distribution ships every package of the source tree: pyproject.toml
lists packages one by one (the repository root is the package), so a new
folder with an ``__init__.py`` must be added there too."""
import os
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


# ---------------------------------------------------------------- the checkout shadows nothing
# Python run from the repository root has the root on sys.path, where the top-level folders
# (the user's fixed layout) carry the names of other packages: the Hub's ``kernels``, which
# transformers imports, above all. Each runs in a fresh interpreter from the root, as
# ``python -m pytest`` / ``python -c`` / a script in the checkout would.
TOP_LEVEL = ("kernels", "ops", "autotune", "bench")  # packages (with an __init__.py) of the checkout
# tests/ has no __init__.py: a namespace portion, which any installed package named ``tests`` outranks.
INSTALLED = TOP_LEVEL + ("tests",)


def _run_from_root(code, **env):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_checkout_does_not_shadow_installed_packages(tmp_path):
    """Installed packages named like our folders are what ``import <name>`` finds from the root,
    submodules included; our package still imports its own folders."""
    site = tmp_path / "site"
    for name in INSTALLED:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"ORIGIN = 'installed {name}'\n")
        (site / name / "sub.py").write_text("VALUE = 7\n")
    out = _run_from_root(
        "import importlib, sys\n"
        f"for name in {INSTALLED!r}:\n"
        "    m = importlib.import_module(name)\n"
        "    assert m.ORIGIN == 'installed ' + name, (name, m.__file__)\n"
        "    assert importlib.import_module(name + '.sub').VALUE == 7\n"
        "import posttrain_kernels\n"
        "from posttrain_kernels import kernels, ops\n"
        "assert not hasattr(kernels, 'ORIGIN') and ops.use_triton\n"
        "assert sys.modules['kernels'].ORIGIN == 'installed kernels'\n"
        "print('ok')\n",
        PYTHONPATH=str(site))
    assert out.strip() == "ok"


def test_checkout_folders_are_not_packages_of_their_own():
    """Nothing installed under a folder's name: importing it fails as if the folder were not there."""
    out = _run_from_root(
        "import importlib, pathlib, sys\n"
        f"for name in {TOP_LEVEL!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e:\n"
        "        assert e.name == name and name not in sys.modules, (name, e)\n"
        "    else:  # a package of that name is installed here: not the checkout's folder\n"
        f"        assert pathlib.Path({str(ROOT)!r}) not in pathlib.Path(sys.modules[name].__file__).resolve().parents\n"
        "print('ok')\n")
    assert out.strip() == "ok"


def test_transformers_hub_kernels_imports_from_the_checkout():
    """transformers >= 5.25 imports the Hub's ``kernels`` package: from the repository root it must
    get that one, and our package must import after it (what CI runs into)."""
    pytest.importorskip("transformers")
    import importlib.util
    if importlib.util.find_spec("transformers.integrations.hub_kernels") is None:
        pytest.skip("this transformers has no hub-kernels integration")
    out = _run_from_root(
        "import transformers.integrations.hub_kernels\n"
        "import pathlib\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError:  # the Hub's package is not installed: nothing to shadow\n"
        "    pass\n"
        "else:\n"
        f"    assert pathlib.Path({str(ROOT)!r}) not in pathlib.Path(kernels.__file__).resolve().parents\n"
        "import posttrain_kernels\n"
        "print('ok')\n")
    assert out.strip() == "ok"


def test_the_triton_36_interpreter_states_its_numpy_bound(monkeypatch):
    """Triton 3.6's interpreter fails with numpy >= 2.4: said once, with the fix, not test by test."""
    import numpy
    import triton

    from posttrain_kernels.ops.backend import interpreter_problem
    for triton_v, numpy_v, bad in (("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.9.0", "2.4.6", False),
                                   ("3.5.1", "2.4.0", True)):
        monkeypatch.setattr(triton, "__version__", triton_v)
        monkeypatch.setattr(numpy, "__version__", numpy_v)
        problem = interpreter_problem()
        assert bool(problem) == bad, (triton_v, numpy_v, problem)
        if bad:
            assert "numpy < 2.4" in problem and triton_v in problem
