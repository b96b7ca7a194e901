"""Dropout forward + backward: torch's (``bernoulli_`` mask) against ``latentlm.nn.dropout``
(uniform draws compared with p), alternating, medians, on the sentence-VAE decoder's shape.

    python benchmarks/bench_dropout.py --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from latentlm.nn.dropout import dropout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 25, 256])
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    print("| threads | dtype | torch F.dropout ms | latentlm ms | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(*args.shape, dtype=dtype, requires_grad=True)
            paths = {"torch": lambda: F.dropout(x, args.p, True).sum().backward(),
                     "latentlm": lambda: dropout(x, args.p).sum().backward()}
            times = {k: [] for k in paths}
            for f in paths.values():
                f()
            for _ in range(args.reps):
                for k, f in paths.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            print(f"| {threads} | {str(dtype).split('.')[1]} | {med['torch']:.2f} | {med['latentlm']:.2f} | "
                  f"{med['torch'] / med['latentlm']:.1f}× |")


if __name__ == "__main__":
    main()
