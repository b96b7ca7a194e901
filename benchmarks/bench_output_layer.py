"""The no-grad (evaluation / importance-sampling) output layer: log softmax(W h + b)[target] for
M rows, V = 10,004, H = 256, through ``LSTMDecoder._inference_log_probs`` — against the bare
matrix product of the same size (the limit this path can reach) — with its log-normalizer
shifted by the row max (max, subtract, exp, sum: four passes over each logits block) and
unshifted (exp, sum: two passes; rows outside ``UNSHIFTED_RANGE`` redone shifted).
Paths alternate within each rep; medians.

    python benchmarks/bench_output_layer.py --threads 1 --reps 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import latentlm.nn.decoders as decoders
from latentlm.nn.decoders import LSTMDecoder
from latentlm.nn.output import log_normalizer_, unshifted_log_normalizer_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", type=int, default=8800, help="M: rows scored per call (an IS chunk's tokens)")
    ap.add_argument("--out", help="write the medians as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, H, M = 10004, 256, args.rows
    d = LSTMDecoder(V, H, H, 32).eval()
    flat, tgt = torch.randn(M, H), torch.randint(0, V - 4, (M,))
    flop = 2 * M * H * V
    w = {torch.float32: d.out.weight.detach().t().contiguous(),
         torch.bfloat16: d.out.weight.detach().t().contiguous().bfloat16()}
    out = {dt: torch.empty(M, V, dtype=dt) for dt in w}
    x = {dt: flat.to(dt) for dt in w}

    def product(dtype):
        return lambda: torch.mm(x[dtype], w[dtype], out=out[dtype])

    def layer(dtype, normalizer):
        def run():
            decoders.unshifted_log_normalizer_ = normalizer
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return d._inference_log_probs(flat, tgt)
        return run

    paths = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        paths[f"{name} bare product"] = product(dtype)
        paths[f"{name} layer, shifted"] = layer(dtype, log_normalizer_)
        paths[f"{name} layer, unshifted"] = layer(dtype, unshifted_log_normalizer_)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():
        fn()  # warm-up: buffers, bf16 weight copy
    for rep in range(args.reps):
        names = list(paths)
        names = names[rep % len(names):] + names[: rep % len(names)]  # rotate the order
        for name in names:
            t = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - t)
    decoders.unshifted_log_normalizer_ = unshifted_log_normalizer_
    with torch.no_grad():
        a, b = layer(torch.float32, log_normalizer_)(), layer(torch.float32, unshifted_log_normalizer_)()
    result = {"threads": args.threads, "rows": M, "reps": args.reps, "max_abs_diff_fp32": float((a - b).abs().max())}
    print(f"threads {args.threads}, M = {M}, V = {V}, H = {H}, {args.reps} reps, medians")
    print(f"| path | ms | GFLOP/s | vs bare product |\n| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        med = statistics.median(ts)
        bare = statistics.median(times[name.split(" ")[0] + " bare product"])
        result[name] = {"ms": med * 1e3, "gflops": flop / med / 1e9, "reps_ms": [t * 1e3 for t in ts]}
        print(f"| {name} | {med * 1e3:.1f} | {flop / med / 1e9:.0f} | {bare / med:.2f} |")
    print(f"fp32 shifted vs unshifted: max |difference| {result['max_abs_diff_fp32']:.2e} nats")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
