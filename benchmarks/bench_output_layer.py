"""The no-grad (evaluation / importance-sampling) output layer: log softmax(W h + b)[target] for
M rows, V = 10,004, H = 256, in row blocks of the size ``LSTMDecoder`` uses — each normalizer
against the bare products of the same blocks (the layer with a free normalizer: the limit it can
reach) and a 2048^3 product (the machine's matmul limit):

- ``shifted``: row max, subtract, exp, sum (four passes over each logits block);
- ``unshifted``: exp in place, fp32 sum (two passes; the module rounds a bf16 block's sum to bf16 instead: the ``module`` path);
- ``log_softmax``: ATen's fused log-softmax in place on the block (fp32 only: in bf16 it would
  round each log-probability to bf16);
- ``module``: ``LSTMDecoder._inference_log_probs`` itself, inside ``frozen_parameters()`` as
  importance sampling calls it (whichever of the above it uses, plus its target gather).
Paths alternate within each rep (order rotated); medians.

``--training``: the training layer's forward + backward instead (M = 658 rows: a batch of 32
PTB sentences): ``nn.Linear`` + cross-entropy against ``linear_log_softmax_gather`` (the fused
layer LSTMDecoder trains with on the CPU) with its (M, V) buffer's rows aligned to
``ALIGN_BYTES`` as it runs, and the same with unpadded rows, in fp32 and bf16.

    python benchmarks/bench_output_layer.py --threads 1 --reps 7
    python benchmarks/bench_output_layer.py --threads 2 --reps 25 --training --rows 658
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from latentlm.nn.decoders import LSTMDecoder
from latentlm.nn import output as output_layer
from latentlm.nn.output import frozen_parameters, linear_log_softmax_gather, log_normalizer_, unshifted_log_normalizer_


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", type=int, default=8800, help="M: rows scored per call (an IS chunk's tokens)")
    ap.add_argument("--out", help="write the medians as JSON here")
    ap.add_argument("--training", action="store_true", help="time the training layer (forward + backward)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.training:
        return training(args)
    torch.manual_seed(0)
    V, H, M = 10004, 256, args.rows
    d = LSTMDecoder(V, H, H, 32).eval()
    flat, tgt = torch.randn(M, H), torch.randint(0, V - 4, (M,))
    flop = 2 * M * H * V
    weight, bias = d.out.weight.detach(), d.out.bias.detach()

    def paths_for(dtype, name):
        w_t, b, x = weight.t().contiguous().to(dtype), bias.to(dtype), flat.to(dtype)
        single, per_thread = d.INFERENCE_BLOCK_ROWS[dtype]
        rows = single if args.threads == 1 else per_thread * args.threads
        buf = torch.empty(rows, V, dtype=dtype)

        def blocks(normalize):
            def run():
                out = torch.empty(M)
                for s in range(0, M, rows):
                    e = min(M, s + rows)
                    out[s:e] = normalize(torch.addmm(b, x[s:e], w_t, out=buf[: e - s]), s, e)
                return out
            return run

        def in_place(logits, s, e):
            torch.log_softmax(logits, 1, out=logits)
            return logits.gather(1, tgt[s:e, None]).squeeze(1)

        def module():  # as importance sampling calls it: inside one frozen_parameters() block
            with torch.no_grad(), frozen_parameters(), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return d._inference_log_probs(flat, tgt)

        out = {f"{name} bare product": blocks(lambda logits, s, e: logits[:, 0].float()),
               f"{name} shifted": blocks(lambda logits, s, e: log_normalizer_(logits)),
               f"{name} unshifted": blocks(lambda logits, s, e: unshifted_log_normalizer_(logits, fp32_sum=True))}
        if dtype == torch.float32:
            out[f"{name} log_softmax"] = blocks(in_place)
        out[f"{name} module"] = module
        return out

    limit = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(2048, 2048).to(dtype)
        best = min(_timed(lambda: a @ a) for _ in range(5))
        limit[name] = 2 * 2048 ** 3 / best / 1e9
    paths = {**paths_for(torch.float32, "fp32"), **paths_for(torch.bfloat16, "bf16")}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():
        fn()  # warm-up: buffers
    for rep in range(args.reps):
        names = list(paths)
        names = names[rep % len(names):] + names[: rep % len(names)]
        for name in names:
            t = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - t)
    result = {"threads": args.threads, "rows": M, "reps": args.reps, "matmul_limit_gflops": limit}
    print(f"threads {args.threads}, M = {M}, V = {V}, H = {H}, {args.reps} reps, medians "
          "(normalizer rows: the whole layer incl. the product)")
    print(f"matmul limit (2048^3, best of 5): fp32 {limit['fp32']:.0f}, bf16 {limit['bf16']:.0f} GFLOP/s")
    print("| path | ms | GFLOP/s | vs bare products | % of the limit |\n| --- | ---: | ---: | ---: | ---: |")
    for name, ts in times.items():
        med = statistics.median(ts)
        bare = statistics.median(times[name.split(" ")[0] + " bare product"])
        result[name] = {"ms": med * 1e3, "gflops": flop / med / 1e9, "reps_ms": [t * 1e3 for t in ts]}
        pct = 100 * flop / med / 1e9 / limit[name.split(" ")[0]]
        print(f"| {name} | {med * 1e3:.1f} | {flop / med / 1e9:.0f} | {bare / med:.2f} | {pct:.0f} % |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


def training(args) -> None:
    torch.manual_seed(0)
    M, H, V = args.rows, 256, 10002
    h = torch.randn(M, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.05).requires_grad_()
    tgt = torch.randint(0, V, (M,))
    aligned = output_layer.aligned_rows

    def unpadded(rows, cols, dtype, device=None, fill=None):
        return torch.empty(rows, cols, dtype=dtype, device=device)

    def fused(dtype, rows_fn):
        def run():
            output_layer.aligned_rows = rows_fn
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    linear_log_softmax_gather(h, weight, None, tgt).sum().backward()
            finally:
                output_layer.aligned_rows = aligned
        return run

    def plain():
        (-torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight), tgt, reduction="none")).sum().backward()

    paths = {"fp32 nn.Linear + cross-entropy": plain, "fp32 fused, aligned rows": fused("fp32", aligned),
             "fp32 fused, unpadded rows": fused("fp32", unpadded), "bf16 fused, aligned rows": fused("bf16", aligned),
             "bf16 fused, unpadded rows": fused("bf16", unpadded)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():
        fn()
    for rep in range(args.reps):
        names = list(paths)
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            h.grad = weight.grad = None
            times[name].append(_timed(paths[name]))
    flop = 3 * 2 * M * H * V
    base = statistics.median(times["fp32 nn.Linear + cross-entropy"])
    result = {"threads": args.threads, "rows": M, "V": V, "reps": args.reps}
    print(f"training layer, forward + backward, threads {args.threads}, M = {M}, V = {V}, H = {H}, "
          f"{args.reps} reps, medians")
    print("| path | ms | GFLOP/s | speed-up vs nn.Linear + CE |\n| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"ms": med * 1e3, "gflops": flop / med / 1e9, "reps_ms": [t * 1e3 for t in ts]}
        print(f"| {name} | {med * 1e3:.1f} | {flop / med / 1e9:.0f} | {base / med:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
