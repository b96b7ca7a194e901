"""Semi-Markov log-partition + gradient: latentlm vs a plain log-space segment recursion and
torch-struct's ``SemiMarkovCRF``, alternating in one run.

Same potentials for all three: K states, segments of length 1..D, B sequences of length T,
float32; each computes log Z and backpropagates to every potential. The *plain recursion*
is the textbook log-space program under autograd (one ``logsumexp`` over a (B, K, K) tensor
for the transitions and one over (B, D, K) for the lengths, per step). torch-struct gets
edge potentials (B, T, D+1, K, K) = seg + trans (its layout; it materializes them, so its
size is capped: configurations whose edge tensor x ``--ts-factor`` exceeds ``--ts-mem-gb``
are skipped and say so). Rounds alternate the three; medians are reported with ratios.

The same run times a large float32 matrix product (the machine's matmul GFLOP/s) and the
hot path's own shape, (B, K) @ (K, K), so the achieved rate can be read against both.

    OMP_NUM_THREADS=1 python benchmarks/bench_semimarkov.py --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from latentlm.structured import semimarkov_log_partition


def problem(B, T, D, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(B, T, D, K, generator=g) - 2.0
    trans = torch.randn(K, K, generator=g).log_softmax(-1)
    init = torch.randn(K, generator=g).log_softmax(-1)
    lengths = torch.full((B,), T, dtype=torch.long)
    return init, trans, seg, lengths


def plain_log_partition(init, trans, seg, lengths):
    """The textbook recursion in log space (all rows of length T), autograd for the gradient."""
    B, T, D, K = seg.shape
    enter = [init.expand(B, K)]
    alpha = None
    for e in range(1, T + 1):
        cand = torch.stack([enter[e - d] + seg[:, e - d, d - 1] for d in range(1, min(D, e) + 1)], 1)  # (B, d, K)
        alpha = torch.logsumexp(cand, 1)
        if e < T:
            enter.append(torch.logsumexp(alpha[:, :, None] + trans[None], 1))  # (B, K, K) -> (B, K)
    return torch.logsumexp(alpha, -1)


def torch_struct_log_partition(init, trans, seg, lengths):
    import torch_struct

    B, T, D, K = seg.shape
    # edge[b, n, d, c_next, c_prev]: a segment of length d starting at n in c_next after c_prev;
    # the first segment's init is added where n = 0 (its c_prev is then ignored by torch-struct: it
    # sums over it, so the init goes to c_prev = 0 only and the other c_prev are -inf).
    edge = torch.full((B, T, D + 1, K, K), -1e9)
    edge[:, :, 1:] = seg.transpose(2, 2)[:, :, :, :, None] + trans.T[None, None, None]
    first = torch.full((K, K), -1e9)
    first[:, 0] = init
    edge[:, 0, 1:] = seg[:, 0, :, :, None] + first[None, None]
    dist = torch_struct.SemiMarkovCRF(edge, lengths=lengths + 1)
    return dist.partition


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_config(B, T, D, K, repeats, peers, ts_mem_gb, ts_factor):
    init, trans, seg, lengths = problem(B, T, D, K)
    leaves = [x.clone().requires_grad_() for x in (init, trans, seg)]

    def call(fn):
        def go():
            for x in leaves:
                x.grad = None
            fn(*leaves, lengths).sum().backward()
        return go

    fns = {"latentlm": call(semimarkov_log_partition), "plain": call(plain_log_partition)}
    skipped = {}
    edge_gb = B * T * (D + 1) * K * K * 4 / 2**30
    if "torch_struct" in peers:
        if edge_gb * ts_factor > ts_mem_gb:
            skipped["torch_struct"] = f"edge tensor {edge_gb:.2f} GB x {ts_factor} > cap {ts_mem_gb} GB"
        else:
            fns["torch_struct"] = call(torch_struct_log_partition)
    with torch.no_grad():
        values = {k: float(f(init, trans, seg, lengths).sum()) for k, f in
                  [("latentlm", semimarkov_log_partition), ("plain", plain_log_partition)]
                  + ([("torch_struct", torch_struct_log_partition)] if "torch_struct" in fns else [])}
    times = {k: [] for k in fns}
    for k, f in fns.items():  # warm-up
        times[k].append(timed(f))
    for k in times:
        times[k] = []
    for _ in range(repeats):  # alternate within every round
        for k, f in fns.items():
            if k == "torch_struct" and len(times[k]) >= 3 and sum(times[k]) > 60:
                continue  # a slow peer: three rounds are enough for its median
            times[k].append(timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = 6 * B * T * K * K + 12 * B * T * D * K  # 2 products per step + transition gradient; length reductions
    return {"B": B, "T": T, "D": D, "K": K, "median_s": med, "rounds": {k: len(v) for k, v in times.items()},
            "speedup_vs": {k: med[k] / med["latentlm"] for k in med if k != "latentlm"},
            "log_z_sum": values, "skipped": skipped, "gflops": flops / med["latentlm"] / 1e9}


def matmul_gflops(n=1024, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = statistics.median(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / t / 1e9


def small_matmul_gflops(B, K, repeats=2000):
    a, b = torch.randn(B, K), torch.randn(K, K)
    out = torch.empty(B, K)
    for _ in range(100):
        torch.mm(a, b, out=out)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    return 2 * B * K * K * repeats / (time.perf_counter() - t0) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--K", type=int, default=45)
    p.add_argument("--T", type=int, default=30)
    p.add_argument("--D", type=int, nargs="+", default=[4, 16])
    p.add_argument("--B", type=int, nargs="+", default=[16, 64])
    p.add_argument("--peers", nargs="*", default=["torch_struct"])
    p.add_argument("--ts-mem-gb", type=float, default=4.0, help="cap on torch-struct's estimated memory")
    p.add_argument("--ts-factor", type=float, default=40.0,
                   help="torch-struct's measured peak / its edge tensor (estimate used for the cap)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    big = matmul_gflops()
    rows = []
    for B in args.B:
        for D in args.D:
            r = run_config(B, args.T, D, args.K, args.repeats, args.peers, args.ts_mem_gb, args.ts_factor)
            r["small_mm_gflops"] = small_matmul_gflops(B, args.K)
            rows.append(r)
            print(json.dumps(r), flush=True)
    big_after = matmul_gflops()
    print(f"\nfp32 1024^3 matmul: {big:.1f} GFLOP/s before, {big_after:.1f} after; threads {args.threads}")
    print("| B | D | latentlm | plain log-space | torch-struct | vs plain | vs torch-struct | GFLOP/s (% of big mm, % of (B,K)@(K,K)) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    peak = max(big, big_after)
    for r in rows:
        m = r["median_s"]
        ts = f"{m['torch_struct'] * 1e3:.0f} ms" if "torch_struct" in m else "skipped"
        vts = f"{r['speedup_vs']['torch_struct']:.0f}x" if "torch_struct" in m else "-"
        print(f"| {r['B']} | {r['D']} | {m['latentlm'] * 1e3:.2f} ms | {m['plain'] * 1e3:.2f} ms | {ts} | "
              f"{r['speedup_vs']['plain']:.1f}x | {vts} | {r['gflops']:.2f} ({100 * r['gflops'] / peak:.1f} %, "
              f"{100 * r['gflops'] / r['small_mm_gflops']:.0f} %) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": [big, big_after], "rows": rows, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
