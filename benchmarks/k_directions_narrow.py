"""K dense directions through a narrow layer: the batched fast path against the reference ``vmap(jvp)`` (1 thread).

The model is the Frank-Wolfe study's logistic regression, ``nn.Linear(784, 2)`` with a batch of 2,000 (random
data, fixed seeds). With K Gaussian directions the reference path computes ``x·W_tᵀ`` as K narrow products
(``bmm`` of ``[2000, 784] @ [784, 2]``). The batched pass computes it as one ``[2K, 784] @ [784, 2000]`` product.
The two paths take turns in one process, and the script prints the median of this thread's CPU time
(``time.thread_time``) over ``--rounds``, which a busy machine moves less than wall time.

Example::

    python benchmarks/k_directions_narrow.py --ks 128,1024 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fwdgrad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="128,1024", help="comma-separated numbers of directions")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per path (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 784, generator=g), torch.randint(0, 2, (2000,), generator=g)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    for k in (int(s) for s in args.ks.split(",")):
        steps = {fast: fwdgrad.ForwardGradient(k, "gaussian", seed=0, fast_paths=fast) for fast in (True, False)}
        times: dict[bool, list[float]] = {True: [], False: []}
        for est in steps.values():
            est(model, loss_fn)  # warm-up
        for _ in range(args.rounds):
            for fast, est in steps.items():
                model.zero_grad(set_to_none=False)
                start = time.thread_time()
                est(model, loss_fn)
                times[fast].append(time.thread_time() - start)
        fast_ms, ref_ms = (statistics.median(times[f]) * 1e3 for f in (True, False))
        print(f"K={k:5d}  batched {fast_ms:8.1f} ms  reference {ref_ms:8.1f} ms  speed-up {ref_ms / fast_ms:.2f}x")


if __name__ == "__main__":
    main()
