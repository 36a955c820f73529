"""Keep the checkout from shadowing installed packages.

The repository root is the package ``posttrain_kernels``, and its top-level
folders (``kernels``, ``ops``, ``autotune``, ``bench``) are the user's fixed
layout. Python run from the root (``python -m pytest``, ``python -c``, a
script there) puts the root on ``sys.path``, so ``import kernels`` would find
our ``kernels/`` folder instead of the installed package of that name (the
Hugging Face Hub's ``kernels``, which transformers imports). Each of those
folders' ``__init__.py`` starts with::

    if __name__ != "posttrain_kernels.<folder>":  # imported by its bare name
        ... resolve(__name__, __file__) ...

and :func:`resolve` puts the installed package of that name in
``sys.modules`` in place of the folder (the import statement then returns
it), or raises ``ModuleNotFoundError`` as if the folder were not there. The
folders work only as ``posttrain_kernels.<folder>`` (they import each other
relatively), so nothing is lost.

This file is loaded by path (a bare-name import has no parent package), and
imports nothing but the standard library.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _real(path: str) -> str:
    return os.path.realpath(path or os.getcwd())


def resolve(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (the checkout's folder, being imported by
    its bare name) by the package of that name found on ``sys.path`` without
    the checkout's root; no such package: ``ModuleNotFoundError``."""
    root = _real(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    path = [p for p in sys.path if isinstance(p, str) and _real(p) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        sys.modules.pop(name, None)
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {name}/ of this checkout is posttrain_kernels.{name}, "
            f"not a package of its own)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
