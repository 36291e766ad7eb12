"""Speed and memory of forward gradients against backprop: every configuration in a fresh process.

Same as ``fwdgrad bench`` (see :mod:`fwdgrad.bench` for what is measured and how)::

    .venv/bin/python benchmarks/speed_memory.py            # full run -> benchmarks/results/speed_memory.{md,json,png}
    .venv/bin/python benchmarks/speed_memory.py --quick    # smoke test on tiny models (< 60 s)
    .venv/bin/python benchmarks/speed_memory.py --models mlp8 --ks 1,16 --threads 2
"""

from __future__ import annotations

import sys

from fwdgrad.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
