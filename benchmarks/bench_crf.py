"""Linear-chain CRF: latentlm vs torch-struct (``LinearChainCRF``) and pytorch-crf (``torchcrf.CRF``),
their own code, in one run: log-likelihood of a tag sequence + gradient (the normalizer's forward
and backward), marginals, Viterbi and sampling, B = 64, T = 30, K in {45, 256, 1024}.

Every library gets the same scores: start (K,), shared transitions (K, K) and emissions (B, T, K)
(pytorch-crf's parameterization; torch-struct gets them folded into its (B, T-1, K, K) log
potentials), full-length sentences. Median seconds of ``--repeats`` calls after a warm-up; a peer
whose working memory would pass ``--peer-mem-gb`` is skipped with that reason (torch-struct's
log-semiring scan holds (B, T/2, K, K, K)-sized tensors; pytorch-crf's normalizer keeps a
(B, K, K) tensor per step for its backward). The machine's matmul limit is measured in the same run.

    python benchmarks/bench_crf.py --threads 2 --out benchmarks/results/crf_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from latentlm.structured import LinearChainCRF


OPS = ("loglik+grad", "marginals", "marginals (differentiable)", "viterbi", "sample")


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_time(lambda: a @ b, 5) / 1e9


def ours(start, trans, emit, tags, lengths):
    def crf():
        return LinearChainCRF(trans, emit, lengths, init=start)

    def loglik_grad():
        for p in (start, trans, emit):
            p.grad = None
        crf().log_prob(tags).sum().backward()

    def fixed():  # scores as inference reads them: no graph back to the parameters
        return LinearChainCRF(trans.detach(), emit.detach(), lengths, init=start.detach())

    return {"loglik+grad": loglik_grad,
            "marginals": lambda: fixed().marginals,
            "marginals (differentiable)": lambda: crf().marginals,
            "viterbi": lambda: crf().argmax,
            "sample": lambda: crf().sample((1,))}


def torch_struct_ops(start, trans, emit, tags, lengths):
    import torch_struct

    def dist():
        # log_potentials[b, n, z_{n+1}, z_n]: transition + the next word's emission (+ start at n = 0)
        edge = trans.t()[None, None] + emit[:, 1:, :, None]
        first = (start + emit[:, 0])[:, None, None, :]  # added to the first edge over z_0 (last dim)
        edge = torch.cat([edge[:, :1] + first, edge[:, 1:]], 1)
        return torch_struct.LinearChainCRF(edge, lengths=lengths)

    def loglik_grad():
        for p in (start, trans, emit):
            p.grad = None
        d = dist()
        d.partition.sum().backward()

    # its marginals always come from autograd.grad(create_graph=True): the same call in both rows
    return {"loglik+grad": loglik_grad,
            "marginals": lambda: dist().marginals,
            "marginals (differentiable)": lambda: dist().marginals,
            "viterbi": lambda: dist().argmax,
            "sample": lambda: dist().sample((1,))}


def pytorch_crf_ops(start, trans, emit, tags, lengths):
    from torchcrf import CRF

    K = trans.size(0)
    crf = CRF(K, batch_first=True)
    with torch.no_grad():
        crf.start_transitions.copy_(start)
        crf.end_transitions.zero_()
        crf.transitions.copy_(trans)

    def loglik_grad():
        crf.zero_grad()
        emit.grad = None
        crf(emit, tags, reduction="sum").backward()

    return {"loglik+grad": loglik_grad, "viterbi": lambda: crf.decode(emit)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--states", default="45,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-mem-gb", type=float, default=8.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    B, T = args.batch, args.length
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "B": B, "T": T,
              "torch": torch.__version__, "matmul_gflops_fp32": round(matmul_gflops(), 1), "rows": []}
    print(f"matmul limit fp32: {result['matmul_gflops_fp32']} GFLOP/s", flush=True)
    for K in (int(k) for k in args.states.split(",")):
        g = torch.Generator().manual_seed(K)
        start = torch.randn(K, generator=g).requires_grad_()
        trans = torch.randn(K, K, generator=g).requires_grad_()
        emit = (2 * torch.randn(B, T, K, generator=g)).requires_grad_()
        tags = torch.randint(0, K, (B, T), generator=g)
        lengths = torch.full((B,), T, dtype=torch.long)
        memory_gb = {"torch-struct": 4 * B * (T / 2) * K ** 3 / 1e9, "pytorch-crf": 4 * 2 * T * B * K * K / 1e9}
        libraries = {"latentlm": ours, "torch-struct": torch_struct_ops, "pytorch-crf": pytorch_crf_ops}
        times: dict[str, dict[str, float | str]] = {}
        for name, make in libraries.items():
            if name != "latentlm" and memory_gb[name] > args.peer_mem_gb:
                times[name] = {op: f"skipped: ≈ {memory_gb[name]:.0f} GB of working memory" for op in OPS}
                if name == "pytorch-crf":  # decoding keeps no tape: still measurable
                    times[name]["viterbi"] = median_time(make(start, trans, emit, tags, lengths)["viterbi"],
                                                         args.repeats)
                continue
            times[name] = {op: median_time(fn, args.repeats) for op, fn in make(start, trans, emit, tags, lengths).items()}
        for op in OPS:
            row = {"K": K, "op": op}
            for name in libraries:
                row[name] = times[name].get(op, "not offered")
            peers = [row[n] for n in ("torch-struct", "pytorch-crf") if isinstance(row[n], float)]
            row["speedup_vs_fastest_peer"] = round(min(peers) / row["latentlm"], 2) if peers else None
            if op == "loglik+grad":  # forward, backward and the transition gradient: 3 B T K^2 multiply-adds
                row["latentlm_gflops"] = round(6 * B * T * K * K / row["latentlm"] / 1e9, 1)
            result["rows"].append(row)
            fmt = {n: (f"{v * 1e3:.2f} ms" if isinstance(v, float) else v) for n, v in row.items() if n in libraries}
            print(f"K={K:5d} {op:12s} {fmt}  speed-up {row['speedup_vs_fastest_peer']}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
