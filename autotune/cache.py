"""Persistent per-GPU tuning cache and the config lookup every launcher uses.

One JSON file per GPU name and Triton version::

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "kernels": {"lora_matmul": {"bfloat16|N=4096|K=4096|w|M<=8192":
                                  {"config": {...}, "ms": 0.43, "default_ms": 0.46}}}}

Lookup order for one launch (first hit wins):

1. ``POSTTRAIN_KERNELS_CONFIG_<KERNEL>``: a pinned config (JSON), always.
2. ``POSTTRAIN_KERNELS_TUNING=off``: skip every cache, use the heuristic default.
3. The user cache: ``$POSTTRAIN_KERNELS_CACHE_DIR`` or
   ``~/.cache/posttrain-kernels/``, file ``<gpu>__triton-<version>.json``.
4. The defaults shipped in the package: ``autotune/tuned/<same file name>``.
5. The heuristic default of the kernel's spec (``autotune/<feature>.py``).

Nothing is tuned during a user's forward pass: tuning happens only in
``posttrain-kernels tune``. A cache file that is unreadable, of another
format, or whose entry names a config outside the (pruned) space of this
GPU is ignored with a warning, never a crash.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import re
import warnings

from . import config as C
from .registry import REGISTRY, KernelSpec

FORMAT = 1
SHIPPED_DIR = pathlib.Path(__file__).parent / "tuned"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(_cache_dir(os.environ.get("POSTTRAIN_KERNELS_CACHE_DIR"),
                                   os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME")))


@functools.lru_cache(maxsize=16)
def _cache_dir(explicit: str | None, xdg: str | None, home: str | None) -> str:
    # Memoised on the variables it reads: select() runs on every launch.
    if explicit:
        return explicit
    base = xdg or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "posttrain-kernels")


def file_name(gpu_name: str, triton_version: str) -> str:
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_")
    return f"{gpu}__triton-{triton_version}.json"


def tuning_enabled() -> bool:
    return os.environ.get("POSTTRAIN_KERNELS_TUNING", "on").lower() not in ("off", "0", "false", "no")


def m_bucket(M: int) -> int:
    """Token counts are bucketed to the next power of two (at least 16): the
    key holds model dimensions and a bucket, never the raw token count."""
    return max(16, 1 << max(0, (M - 1).bit_length()))


def make_key(dtype_name: str, **dims) -> str:
    """``dtype|name=value|...`` in the spec's key order, with M replaced by its
    bucket and string dims (operand layouts) written as they are."""
    parts = [dtype_name]
    for name, value in dims.items():
        if name == "M":
            parts.append(f"M<={m_bucket(value)}")
        elif isinstance(value, str):
            parts.append(value)
        else:
            parts.append(f"{name}={value}")
    return "|".join(parts)


def parse_key(spec: KernelSpec, key: str) -> tuple[str, dict]:
    """(dtype, dims) of a key written by ``make_key`` for ``spec``; raises
    ``ValueError`` when the key does not have the spec's dimensions."""
    dtype, *parts = key.split("|")
    if len(parts) != len(spec.key):
        raise ValueError(f"expected the dimensions {spec.key}")
    dims = {}
    for name, part in zip(spec.key, parts):
        if name == "M":
            if not part.startswith("M<="):
                raise ValueError(f"expected M<=bucket, got {part!r}")
            dims[name] = int(part[3:])
        elif "=" in part:
            got, _, value = part.partition("=")
            if got != name:
                raise ValueError(f"expected {name}=..., got {part!r}")
            dims[name] = int(value)
        else:
            dims[name] = part
    return dtype, dims


def load_file(path: pathlib.Path, gpu_name: str, triton_version: str, cc: int) -> dict:
    """{kernel: {key: Config}} from one cache file; {} (with a warning) if the
    file is unusable. Entries outside this GPU's space are dropped, each with
    a warning."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT}")
        if data.get("gpu") != gpu_name or data.get("triton") != triton_version:
            raise ValueError(f"written for {data.get('gpu')!r} / triton {data.get('triton')!r}")
        kernels = data["kernels"]
        if not isinstance(kernels, dict):
            raise ValueError("'kernels' is not an object")
    except Exception as e:  # corrupt, stale or foreign: ignore the whole file
        warnings.warn(f"posttrain-kernels: ignoring tuning cache {path}: {e}", stacklevel=2)
        return {}
    out = {}
    for kernel, entries in kernels.items():
        table = out.setdefault(kernel, {})
        for key, entry in (entries.items() if isinstance(entries, dict) else ()):
            try:
                cfg = C.Config.from_dict(entry["config"])
            except Exception as e:
                warnings.warn(f"posttrain-kernels: {path}: bad entry {kernel} {key}: {e}", stacklevel=2)
                continue
            if not _valid(kernel, key, cc, cfg):
                warnings.warn(f"posttrain-kernels: {path}: {kernel} {key}: config {cfg} is not in this "
                              f"GPU's space (stale cache?); ignored", stacklevel=2)
                continue
            table[key] = cfg
    return out


def _valid(kernel: str, key: str, cc: int, cfg: C.Config) -> bool:
    """The entry names a registered kernel, a key of its dimensions and a
    config of its pruned space on this target."""
    spec = REGISTRY.get(kernel)
    if spec is None:
        return False
    try:
        dtype, dims = parse_key(spec, key)
    except ValueError:
        return False
    return cfg in spec.valid_configs(dtype, cc, dims)


@functools.lru_cache(maxsize=None)
def _tables(gpu_name: str, triton_version: str, cc: int, user_dir: str) -> tuple[dict, dict]:
    name = file_name(gpu_name, triton_version)
    user = load_file(pathlib.Path(user_dir) / name, gpu_name, triton_version, cc)
    shipped = load_file(SHIPPED_DIR / name, gpu_name, triton_version, cc)
    return user, shipped


@contextlib.contextmanager
def env_override(variable: str, value: str):
    """The environment variable set to ``value`` for the block, everything
    built from the picks reset on the way in and out (the launchers' plans
    read the environment when they are built): how ``tune`` pins a config
    and the benchmarks force a kernel path."""
    saved = os.environ.get(variable)
    os.environ[variable] = value
    reset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved
        reset()


RESET_HOOKS: list = []  # callables that drop what was built from the picks (the launchers' memoised plans)


def reset() -> None:
    """Forget the loaded files and memoised picks (after ``tune`` wrote a
    file, or in tests), and everything built from them (``RESET_HOOKS``)."""
    _tables.cache_clear()
    _lookup.cache_clear()
    _PICKS.clear()
    for hook in RESET_HOOKS:
        hook()


_PICKS: dict = {}


def select_config(spec: KernelSpec, dtype_name: str, device_info: tuple | None, **dims) -> C.Config:
    """The config of one launch of ``spec``'s kernel, memoised on everything
    the answer depends on: the kernel, dtype, key dimensions, device and the
    three environment variables that change it. A hit costs three
    environment reads and one dict lookup (the launchers' hot path).
    ``dims``: the spec's key dimensions (raw token count as M)."""
    env = (os.environ.get(C.pin_variable(spec.name)), os.environ.get("POSTTRAIN_KERNELS_TUNING"),
           os.environ.get("POSTTRAIN_KERNELS_CACHE_DIR"))
    memo_key = (spec.name, dtype_name, tuple(dims.items()), device_info, env)
    cfg = _PICKS.get(memo_key)
    if cfg is None:
        if len(_PICKS) > 8192:  # many distinct token counts: start over rather than grow
            _PICKS.clear()
        ordered = {name: dims[name] for name in spec.key}
        key = make_key(dtype_name, **ordered) if device_info is not None else ""
        cc = None if device_info is None else device_info[1]
        cfg = _PICKS[memo_key] = select(spec.name, key, device_info, lambda: spec.default(dtype_name, cc, ordered))
    return cfg


@functools.lru_cache(maxsize=8192)
def _lookup(kernel: str, key: str, gpu_name: str, triton_version: str, cc: int, user_dir: str):
    user, shipped = _tables(gpu_name, triton_version, cc, user_dir)
    for table in (user, shipped):
        cfg = table.get(kernel, {}).get(key)
        if cfg is not None:
            return cfg
    return None


def select(kernel: str, key: str, device_info: tuple | None, default):
    """The config for one launch, by the lookup order in this module's doc.

    ``device_info``: (gpu name, compute capability) or None under the
    interpreter (which has no cache); ``default``: a zero-argument callable
    giving the heuristic pick.
    """
    pinned = C.pinned(kernel)
    if pinned is not None:
        return pinned
    if device_info is None or not tuning_enabled():
        return default()
    gpu_name, cc = device_info
    user_dir = _cache_dir(os.environ.get("POSTTRAIN_KERNELS_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"),
                          os.environ.get("HOME"))
    cfg = _lookup(kernel, key, gpu_name, _triton_version(), cc, user_dir)
    return cfg if cfg is not None else default()


@functools.lru_cache(maxsize=1)
def _triton_version() -> str:
    import triton
    return triton.__version__


def write(path: pathlib.Path, gpu_name: str, triton_version: str, entries: dict, extra: dict | None = None) -> None:
    """Merge ``entries`` ({kernel: {key: {"config": {...}, ...}}}) into the
    cache file at ``path`` (created if missing; an unreadable one is replaced)."""
    data = {"format": FORMAT, "gpu": gpu_name, "triton": triton_version, "kernels": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("format") == FORMAT and old.get("gpu") == gpu_name and old.get("triton") == triton_version:
                data = old
        except Exception:
            pass
    data.update(extra or {})
    for kernel, table in entries.items():
        data["kernels"].setdefault(kernel, {}).update(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    reset()
