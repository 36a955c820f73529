"""The specialisations a compile-only run recorded, per kernel (``autotune/compile_only.py``)::

    python -m posttrain_kernels.bench.compile_count <folder> [<folder> ...]
"""
from __future__ import annotations

import sys

from ..autotune.compile_only import count, records


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m posttrain_kernels.bench.compile_count <folder> [<folder> ...]",
              file=sys.stderr)
        return 2
    total = set()
    for path in argv:
        counts = count(path)
        n = sum(c for c, _ in counts.values())
        print(f"{path}: {n} specialisations, {sum(l for _, l in counts.values())} launches")
        for kernel, (c, launches) in counts.items():
            print(f"  {kernel:28s} {c:4d} specialisations {launches:6d} launches")
        total.update(records(path))
    if len(argv) > 1:
        print(f"all: {len(total)} specialisations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
