"""HMM log-likelihood (+ gradient) against torch-struct, pyro-ppl and hmmlearn, in one run.

Same parameters and observations for every library: B sentences of T words over V word
types, K states. Each library computes log p(x) per sentence from (init, transition,
emission matrix, observed word ids); the torch libraries also backpropagate to all three
parameter tables (hmmlearn's ``score`` is forward only). Reported: median seconds over
``--repeats`` runs, tokens/s, our speed-up over the fastest peer, and the largest relative
difference of the log-likelihoods from ours. At K = 1024 we also report achieved GFLOP/s
of our forward+backward (6 B T K^2 flops: forward, beta recursion, transition gradient)
against a large float32 matrix product timed in the same process.

Peers whose memory would exceed ``--peer-mem-gb`` are run in batch chunks (pyro) or skipped
with the reason (torch-struct's log-semiring scan materializes (B, T/2, K, K, K) tensors).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 \
        .venv/bin/python benchmarks/bench_hmm.py --threads 1
    .venv/bin/python benchmarks/bench_hmm.py --memory   # peak memory at K = 4096, T = 1000
    .venv/bin/python benchmarks/bench_hmm.py --peers hmmlearn --large-batch 0   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from latentlm.structured import emission_scores, hmm_log_likelihood


def median_time(fn, repeats: int, warmup: int = 1, budget: float = 20.0) -> float:
    """Median of ``repeats`` timed calls; slow calls (a peer at large K) stop at ``budget`` seconds."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if time.perf_counter() - t0 > budget / 2:
        warmup = 0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if sum(ts) > budget:
            break
    return statistics.median(ts)


def make_problem(B, T, V, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_init = torch.randn(K, generator=g).log_softmax(-1)
    log_trans = torch.randn(K, K, generator=g).log_softmax(-1)  # (K, K) row = previous
    log_b = torch.randn(K, V, generator=g).log_softmax(-1)      # (K, V)
    obs = torch.randint(0, V, (B, T), generator=g)
    return log_init, log_trans, log_b, obs


def ours(log_init, log_trans, log_b, obs, backward=True):
    li, lt, lb = (x.detach().requires_grad_(backward) for x in (log_init, log_trans, log_b))
    ll = hmm_log_likelihood(li, lt, emission_scores(lb, obs))  # (B,)
    if backward:
        ll.sum().backward()
    return ll.detach()


def torch_struct_ll(log_init, log_trans, log_b, obs):
    from torch_struct import LinearChain, LinearChainCRF

    li, lt, lb = (x.detach().requires_grad_(True) for x in (log_init, log_trans, log_b))
    # torch-struct's edges are [b, n, z_{n+1}, z_n]: it wants transition[next, prev].
    edges = LinearChain.hmm(lt.t(), lb.t(), li, obs)
    ll = LinearChainCRF(edges).partition
    ll.sum().backward()
    return ll.detach()


def _gathered_observations(log_b):
    """A pyro observation distribution whose log_prob is a gather of the (K, V) table.

    ``Categorical(logits=log_b)`` (the obvious spelling) broadcasts the table to
    (B, T, K, V) and its gradient is that size, 20 GB at K = 256; this is pyro at its best.
    """
    import pyro.distributions as dist
    from torch.distributions import constraints

    class GatheredCategorical(dist.TorchDistribution):
        arg_constraints: dict = {}
        support = constraints.nonnegative_integer

        def __init__(self, table):
            self.table = table
            super().__init__(batch_shape=table.shape[:1], event_shape=torch.Size(), validate_args=False)

        def log_prob(self, value):  # value (..., T, 1) -> (..., T, K)
            return emission_scores(self.table, value.squeeze(-1).reshape(-1, value.size(-2))).reshape(
                *value.shape[:-1], self.table.size(0))

    return GatheredCategorical(log_b)


def pyro_ll(log_init, log_trans, log_b, obs, chunk, natural=False):
    import pyro.distributions as dist

    li, lt, lb = (x.detach().requires_grad_(True) for x in (log_init, log_trans, log_b))
    # pyro's initial state z_0 comes one transition *before* the first observation; an
    # identity matrix as the first step makes z_1 = z_0 ~ init, which is our model.
    outs = []
    for s in range(0, obs.size(0), chunk):
        o = obs[s : s + chunk]
        T = o.size(1)
        eye = torch.full((lt.size(0), lt.size(0)), -torch.inf).fill_diagonal_(0.0)
        trans = torch.cat([eye.unsqueeze(0), lt.expand(T - 1, -1, -1)], 0)  # (T, K, K), step 0 = identity
        obs_dist = dist.Categorical(logits=lb) if natural else _gathered_observations(lb)
        hmm = dist.DiscreteHMM(li, trans, obs_dist)
        ll = hmm.log_prob(o)
        ll.sum().backward()
        outs.append(ll.detach())
    return torch.cat(outs)


def hmmlearn_model(log_init, log_trans, log_b, implementation):
    from hmmlearn import hmm

    K, V = log_b.shape
    m = hmm.CategoricalHMM(n_components=K, implementation=implementation, init_params="", params="")
    m.n_features = V
    m.startprob_ = log_init.double().exp().numpy()
    m.transmat_ = log_trans.double().exp().numpy()
    m.emissionprob_ = log_b.double().exp().numpy()
    m.startprob_ /= m.startprob_.sum()
    m.transmat_ /= m.transmat_.sum(1, keepdims=True)
    m.emissionprob_ /= m.emissionprob_.sum(1, keepdims=True)
    return m


def blas_info() -> list[dict]:
    from threadpoolctl import threadpool_info

    return [
        {k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
        for d in threadpool_info()
    ]


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: a @ b, repeats)
    return 2 * n**3 / t / 1e9


PEERS = ("torch-struct", "pyro", "hmmlearn")


def bench_size(B, T, V, K, repeats, peer_mem_gb, peers_to_run=PEERS) -> dict:
    log_init, log_trans, log_b, obs = make_problem(B, T, V, K)
    row: dict = {"B": B, "T": T, "V": V, "K": K}
    ref = ours(log_init.double(), log_trans.double(), log_b.double(), obs)  # float64 reference values
    t = median_time(lambda: ours(log_init, log_trans, log_b, obs), repeats)
    ll = ours(log_init, log_trans, log_b, obs)
    row["ours"] = {"seconds": t, "tokens_per_s": B * T / t, "max_rel_diff": float(((ll.double() - ref) / ref).abs().max())}
    row["ours"]["gflops"] = 6 * B * T * K * K / t / 1e9
    tf = median_time(lambda: ours(log_init, log_trans, log_b, obs, backward=False), repeats)
    row["ours_forward_only"] = {"seconds": tf, "tokens_per_s": B * T / tf}

    peers = {}
    # torch-struct: the log-semiring parallel scan holds (B, T/2, K, K, K) floats.
    need = B * (T // 2) * K**3 * 4 * 2 / 1e9
    if "torch-struct" not in peers_to_run:
        pass
    elif need > peer_mem_gb:
        peers["torch-struct"] = {"skipped": f"needs ~{need:.0f} GB ((B, T/2, K, K, K) log-semiring scan)"}
    else:
        t = median_time(lambda: torch_struct_ll(log_init, log_trans, log_b, obs), repeats)
        v = torch_struct_ll(log_init, log_trans, log_b, obs)
        peers["torch-struct"] = {"seconds": t, "tokens_per_s": B * T / t, "max_rel_diff": float(((v.double() - ref) / ref).abs().max())}
    # pyro: (B, T, K, K) factors, several copies; chunk the batch to stay within memory. Its
    # parallel scan costs O(B T K^3), so at large K it is timed on the first ``rows``
    # sentences only and reported per token (its cost is linear in B).
    if "pyro" in peers_to_run:
        per_row = T * K * K * 4 * 6 / 1e9
        chunk = max(1, min(B, int(peer_mem_gb / per_row)))
        rows = B if K <= 256 else min(B, 4)
        o = obs[:rows]
        t = median_time(lambda: pyro_ll(log_init, log_trans, log_b, o, chunk), repeats)
        v = pyro_ll(log_init, log_trans, log_b, o, chunk)
        peers["pyro DiscreteHMM (gathered emissions)"] = {
            "seconds": t * B / rows, "tokens_per_s": rows * T / t, "batch_chunk": chunk, "timed_rows": rows,
            "max_rel_diff": float(((v.double() - ref[:rows]) / ref[:rows]).abs().max()),
        }
        # The obvious spelling, Categorical(logits=(K, V)), has a (B, T, K, V) gradient.
        need = B * T * K * V * 4 * 2 / 1e9
        if need > peer_mem_gb:
            peers["pyro DiscreteHMM (Categorical)"] = {"skipped": f"needs ~{need:.0f} GB ((B, T, K, V) emission gradient)"}
        else:
            t = median_time(lambda: pyro_ll(log_init, log_trans, log_b, obs, B, natural=True), repeats)
            peers["pyro DiscreteHMM (Categorical)"] = {"seconds": t, "tokens_per_s": B * T / t}
    # hmmlearn: forward only, float64, C++ loops; both of its implementations, keep the faster.
    if "hmmlearn" in peers_to_run:
        X = obs.reshape(-1, 1).numpy()
        lengths = [T] * B
        best = None
        for impl in ("log", "scaling"):
            m = hmmlearn_model(log_init, log_trans, log_b, impl)
            t = median_time(lambda: m.score(X, lengths), repeats)
            if best is None or t < best[0]:
                best = (t, impl, m)
        t, impl, m = best
        v = torch.tensor([m.score(obs[b].reshape(-1, 1).numpy()) for b in range(B)], dtype=torch.float64)
        peers["hmmlearn CategoricalHMM.score (forward only)"] = {
            "seconds": t, "tokens_per_s": B * T / t, "implementation": impl,
            "max_rel_diff": float(((v - ref) / ref).abs().max()),
        }
    row["peers"] = peers
    timed = [p["seconds"] for p in peers.values() if "seconds" in p]
    row["speedup_vs_fastest_peer"] = min(timed) / row["ours"]["seconds"]
    return row


def _status_kb(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(B: int, T: int, K: int) -> None:
    """Run in a fresh process: peak resident memory of log-likelihood + gradient at (B, T, K).

    The high-water mark is reset (``echo 5 > /proc/self/clear_refs``, Linux) once the inputs
    exist, so the peak is the largest RSS reached *during* forward + backward, not the
    difference of two lifetime maxima (which hides growth below an earlier peak).
    ``peak_over_emission`` = (VmHWM - VmRSS at the reset) / emission bytes: everything the
    call allocates, gradients (held in ``.grad`` at the end) included; ``peak_total_over_emission``
    adds the emission input itself. One tiny call runs before the reset (library warm-up).
    """
    import gc

    torch.manual_seed(0)
    # One tiny call first, so lazily initialized library buffers (OpenBLAS's work buffer, the
    # autograd engine) are not charged to the problem.
    w = torch.zeros(2, 3, 8, requires_grad=True)
    hmm_log_likelihood(torch.zeros(8), torch.zeros(8, 8), w).sum().backward()
    del w
    rss_libs = _status_kb("VmRSS")
    li = torch.randn(K).log_softmax(-1).requires_grad_()
    lt = torch.randn(K, K).log_softmax(-1).requires_grad_()
    le = torch.randn(B, T, K).sub_(8).requires_grad_()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kb("VmRSS")
    hwm0 = _status_kb("VmHWM")
    t0 = time.perf_counter()
    ll = hmm_log_likelihood(li, lt, le)
    ll.sum().backward()
    secs = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    emit = le.numel() * le.element_size()
    print(json.dumps({
        "B": B, "T": T, "K": K, "seconds": secs, "emission_MB": emit / 2**20, "transition_MB": K * K * 4 / 2**20,
        "rss_libs_MB": rss_libs / 2**20, "rss_at_reset_MB": rss0 / 2**20, "hwm_after_reset_MB": hwm0 / 2**20,
        "peak_MB": peak / 2**20, "peak_extra_MB": (peak - rss0) / 2**20,
        "peak_over_emission": (peak - rss0) / emit, "peak_total_over_emission": (peak - rss0 + emit) / emit,
        "grad_contiguous": bool(le.grad.is_contiguous()), "finite": bool(torch.isfinite(ll).all()),
    }))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--T", type=int, default=30)
    p.add_argument("--V", type=int, default=10_000)
    p.add_argument("--K", type=int, nargs="+", default=[45, 256, 1024])
    p.add_argument("--large-batch", type=int, default=512, help="extra K=1024 run for GFLOP/s (0: skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peer-mem-gb", type=float, default=3.0)
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="peer libraries to time")
    p.add_argument("--memory", action="store_true", help="peak memory at --mem-shape instead")
    p.add_argument("--mem-shape", type=int, nargs=3, default=[16, 1000, 4096], metavar=("B", "T", "K"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write all results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(*args.mem_shape)
        return 0
    if args.memory:
        cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--mem-shape", *map(str, args.mem_shape)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        print(out)
        return 0
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    results = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "numpy": np.__version__,
        "threads": args.threads, "blas": blas_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")},
        "matmul_gflops_2048": matmul_gflops(), "rows": [],
    }
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}), flush=True)
    for K in args.K:
        row = bench_size(args.B, args.T, args.V, K, args.repeats, args.peer_mem_gb, args.peers)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.large_batch and 1024 in args.K:
        B = args.large_batch
        li, lt, lb, obs = make_problem(B, args.T, args.V, 1024)
        t = median_time(lambda: ours(li, lt, lb, obs), max(3, args.repeats // 2))
        big = {"B": B, "T": args.T, "K": 1024, "seconds": t, "tokens_per_s": B * args.T / t,
               "gflops": 6 * B * args.T * 1024**2 / t / 1e9}
        big["fraction_of_matmul"] = big["gflops"] / results["matmul_gflops_2048"]
        results["large_batch"] = big
        print(json.dumps(big), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
