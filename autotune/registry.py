"""One spec per kernel: everything the launchers, the tuning cache, ``tune``
and the ahead-of-time compile need to know about it, in one place.

A ``KernelSpec`` names the ``@triton.jit`` function, its config space and
prune rule, its default pick, the dimensions of its cache key and the
specialisations (``AotVariant``) the AOT harness compiles. Each feature
declares its specs in its own module of this package (``lora.py``,
``multi_lora.py``, ``moe.py``); ``REGISTRY`` maps kernel names to them.

``check_signature`` verifies a spec against the kernel's own argument list:
every constexpr is supplied by the config, the spec's constants or a
variant's flags, every other argument is typed (pointer, fp32 scalar or
integer), and no variant names an argument the kernel lacks. A spec that
drifts from its kernel fails the test suite before anything compiles.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
from typing import Callable, Optional

from . import compile_only
from .config import DTYPES, RANK_BLOCKS, Config, rank_block

REGISTRY: dict[str, "KernelSpec"] = {}
# Dimensions the default picks are checked at (token counts from decode to
# long prefill; model widths; ranks on both sides of each rank block).
DEFAULT_DIMS = {"M": (1, 64, 300, 2048, 8192), "N": (512, 4096, 14336), "K": (512, 4096, 14336),
                "D": (64, 1000, 4096), "R": (16, 17, 64, 256)}


@dataclasses.dataclass(frozen=True)
class AotVariant:
    """One specialisation of a kernel, compiled as the JIT would compile it
    at model shapes.

    ``pointers``: pointer argument -> element type, ``"x"`` for the compute
    dtype, ``"adapter"`` for the adapters' dtype (fp32 when ``adapter_fp32``,
    PEFT's default, else the compute dtype), or a Triton type (``"fp32"``,
    ``"i32"``, ``"i64"``). ``flags``: constexpr values of this layout.
    ``ones``: integer arguments equal to 1 (unit strides, specialised away by
    the JIT). ``plain``: integer arguments not known to be multiples of 16;
    every other integer gets the divisibility attribute, as model shapes do.
    ``min_cc``: the lowest target the variant compiles for (Triton has no
    e4m3 below sm_89, so the fp8 variants of the decoding kernels start there).
    """

    name: str
    pointers: dict
    flags: dict
    ones: frozenset = frozenset()
    plain: frozenset = frozenset()
    adapter_fp32: bool = False
    min_cc: int = 0  # the targets it exists on (fp8 e4m3 operands: sm_89 and up)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A kernel's identity.

    ``key``: the dimensions of its cache key, in order (string-valued ones,
    such as ``layout``, are operand layouts; ``M`` is bucketed).
    ``space(dtype)`` lists candidate configs; ``prune(cfgs, dtype, cc,
    block_r)`` keeps those that fit the target; ``default(dtype, cc, dims)``
    is the heuristic pick (``cc=None``: the interpreter). ``rank_blocked``:
    the kernel holds the whole rank in one ``BLOCK_R`` tile derived from the
    rank (not a config entry), so the space is per rank block. ``constants``:
    constexprs fixed for every launch. ``floats``: the fp32 scalar arguments
    (every other non-pointer argument is an integer). ``options``: compile
    options of every launch and of the AOT compile (``enable_fp_fusion``).
    """

    name: str
    fn: object
    key: tuple
    space: Callable[[str], list]
    default: Callable[[str, Optional[int], dict], Config]
    variants: tuple
    prune: Callable = lambda cfgs, dtype, cc, block_r: list(cfgs)
    rank_blocked: bool = False
    constants: dict = dataclasses.field(default_factory=dict)
    floats: frozenset = frozenset()
    layouts: tuple = ()  # the values of the key's ``layout`` dimension, if it has one
    rank_cap: int = RANK_BLOCKS[-1]  # rank-blocked kernels: the widest rank tile (larger ranks: more programs)
    picked: Callable = lambda dtype, cc: True  # whether the launchers run this kernel for dtype on cc
    options: dict = dataclasses.field(default_factory=dict)  # compile options of every launch (enable_fp_fusion)

    def variant_indices(self, cc: int) -> list[int]:
        """The variants (indices into ``variants``) that exist on target ``cc``."""
        return [i for i, v in enumerate(self.variants) if v.min_cc <= cc]

    def block_r(self, R: int) -> int:
        """The rank tile of a rank-blocked kernel at rank R: R padded to a
        power of two ≥ 16, at most ``rank_cap`` (the launch grid then has
        cdiv(R, BLOCK_R) programs along the rank)."""
        return min(rank_block(R), self.rank_cap)

    # ---- the configs a launch may use
    def configs(self, dtype: str, cc: int, block_r: Optional[int] = None) -> list[Config]:
        """The pruned space for one dtype, target and (rank-blocked kernels) rank block."""
        return self.prune(self.space(dtype), dtype, cc, block_r)

    def block_rs(self) -> tuple:
        return tuple(b for b in RANK_BLOCKS if b <= self.rank_cap) if self.rank_blocked else (None,)

    def compiled_space(self, cc: int) -> list[tuple]:
        """Every (config, dtype, rank block) the launchers may pick on ``cc``:
        what the AOT harness compiles and the tests check the defaults against."""
        return [(c, d, br) for d in DTYPES for br in self.block_rs() for c in self.configs(d, cc, br)]

    def defaults(self, cc: int) -> set:
        """Every (config, dtype, rank block) the heuristic default picks on
        ``cc`` over model-like dimensions (``DEFAULT_DIMS``): what the AOT
        harness compiles with every variant and checks for spills."""
        out = set()
        values = [self.layouts if name == "layout" else DEFAULT_DIMS[name] for name in self.key]
        for d in DTYPES:
            if not self.space(d) or not self.picked(d, cc):
                continue
            for combo in itertools.product(*values):
                dims = dict(zip(self.key, combo))
                if self.rank_blocked:
                    out.add((self.default(d, cc, dims), d, self.block_r(dims["R"])))
                elif self.configs(d, cc):
                    out.add((self.default(d, cc, dims), d, None))
        return out

    def valid_configs(self, dtype: str, cc: int, dims: dict) -> set:
        """The configs a cache entry with these key dimensions may hold."""
        if dtype not in DTYPES:
            return set()
        block_r = self.block_r(int(dims["R"])) if self.rank_blocked else None
        return set(self.configs(dtype, cc, block_r))

    def launch_kwargs(self, cfg: Config, block_r: Optional[int] = None) -> dict:
        """Keyword arguments of a launch: the config, the spec's constants and
        (rank-blocked kernels) ``BLOCK_R``."""
        kw = {**cfg.launch_kwargs(), **self.constants, **self.options}
        if self.rank_blocked:
            kw["BLOCK_R"] = block_r
        return kw

    # ---- the kernel's own argument list
    def arguments(self) -> list[tuple[str, bool]]:
        """(name, is constexpr) of every kernel argument, in order (works for
        the JIT function and for the interpreter's wrapper alike)."""
        import triton.language as tl
        fn = getattr(self.fn, "fn", self.fn)
        return [(p.name, p.annotation is tl.constexpr) for p in inspect.signature(fn).parameters.values()]

    def check_signature(self, cfg: Config) -> None:
        """Raise ``ValueError`` unless every variant, with ``cfg``, types every
        argument of the kernel and names no argument it lacks."""
        args = self.arguments()
        names = {n for n, _ in args}
        constexprs = {n for n, c in args if c}
        for v in self.variants:
            given = set(cfg.kwargs) | set(self.constants) | set(v.flags) | ({"BLOCK_R"} if self.rank_blocked else set())
            named = (set(v.pointers) | set(v.flags) | v.ones | v.plain | self.floats | set(self.constants)
                     | set(cfg.kwargs))
            unknown = named - names
            if unknown:
                raise ValueError(f"{self.name} ({v.name}): names arguments the kernel lacks: {sorted(unknown)}")
            missing = constexprs - given - v.ones
            if missing:
                raise ValueError(f"{self.name} ({v.name}): constexprs without a value: {sorted(missing)}")
            for n, is_constexpr in args:
                if is_constexpr and n in v.pointers:
                    raise ValueError(f"{self.name} ({v.name}): {n} is a constexpr, typed as a pointer")
                if not is_constexpr and n.endswith("_ptr") and n not in v.pointers:
                    raise ValueError(f"{self.name} ({v.name}): pointer {n} has no element type")
                if not is_constexpr and n in v.pointers and not n.endswith("_ptr"):
                    raise ValueError(f"{self.name} ({v.name}): {n} is typed as a pointer but not named *_ptr")


def register(spec: KernelSpec) -> KernelSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"kernel spec {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    compile_only.install(spec)  # POSTTRAIN_KERNELS_COMPILE_ONLY: launches record and warm up instead
    return spec
