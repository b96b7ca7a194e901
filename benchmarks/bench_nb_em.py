"""Time per EM iteration of M1: latentlm (torch, sparse CSR) vs a scipy.sparse/numpy EM.

Both implementations run the same iteration on the same count matrix in one process,
alternating, from the same starting parameters:

    E: J = X @ log(pi)^T + log(mu); R = softmax(J)      M: pi ∝ R^T X + alpha; mu ∝ sum R

and must agree on the log-likelihood after the timed iterations. We report medians of the
per-iteration wall time and the ratio numpy / latentlm (> 1: latentlm is faster).

Run it with the peer's BLAS left to pick its own kernel (the shared machine pins
OpenBLAS to a core type for reproducibility; that must not handicap the peer):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 \
        .venv/bin/python benchmarks/bench_nb_em.py --threads 1

The BLAS libraries in use (threadpoolctl) are printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp
import torch

from latentlm.data.documents import load_documents
from latentlm.inference.em import EMData, MixtureParams, em_iteration, m_step
from latentlm.models.nb_mixture import NaiveBayesMixture

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "docs" / "20news-bydate.test.jsonl"


class NumpyEM:
    """The same EM with scipy.sparse CSR products and numpy dense math."""

    def __init__(self, counts: sp.csr_matrix, log_mix: np.ndarray, log_words: np.ndarray, alpha: float):
        self.x = counts.tocsr()                  # (N, V)
        self.xt = counts.T.tocsr()               # (V, N): CSR so the M-step product is row-major too
        self.log_mix, self.log_words, self.alpha = log_mix, log_words, alpha

    def iteration(self) -> float:
        joint = self.x @ self.log_words.T + self.log_mix            # (N, K)
        top = joint.max(axis=1, keepdims=True)
        joint -= top
        # same flush-to-zero of subnormal responsibilities as latentlm (it speeds both up)
        floor = np.log(np.finfo(joint.dtype).tiny) + np.log(joint.shape[1]) + 1.0
        joint[joint < floor] = -np.inf
        p = np.exp(joint)
        norm = p.sum(axis=1, keepdims=True)
        log_lik = float((top + np.log(norm)).sum(dtype=np.float64))
        resp = p / norm                                              # (N, K)
        expected = (self.xt @ resp).T                                # (K, V)
        v = expected.shape[1]
        self.log_words = np.log(expected + self.alpha) - np.log(expected.sum(1, keepdims=True) + v * self.alpha)
        self.log_mix = np.log(resp.sum(0)) - np.log(resp.shape[0])
        return log_lik


def blas_info() -> list[dict]:
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "version", "architecture", "threading_layer", "num_threads", "filepath")
    return [{k: lib.get(k) for k in keep if k in lib} for lib in threadpool_info()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a .jsonl document file")
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.01, help="Dirichlet smoothing (both sides)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    np_dtype = np.float32 if args.dtype == "float32" else np.float64
    t_dtype = torch.float32 if args.dtype == "float32" else torch.float64

    bow = load_documents(args.data)  # 10k words, English stop words removed, min df 3
    counts = bow.counts.astype(np_dtype)
    model = NaiveBayesMixture(bow.vocab_size, args.clusters).to(t_dtype)
    data = EMData(bow, dtype=t_dtype)
    # common start: one M-step from Dirichlet(1) responsibilities
    rng = np.random.default_rng(0)
    resp0 = rng.dirichlet(np.ones(args.clusters), size=len(bow)).astype(np_dtype)
    m_step(model, data, torch.from_numpy(resp0), args.alpha)
    peer = NumpyEM(counts, model.log_mixture().detach().numpy().copy(),
                   model.log_word_probs().detach().numpy().copy(), args.alpha)

    state = {"params": MixtureParams.from_model(model, t_dtype)}

    def ours() -> float:  # exactly fit_em's inner iteration
        state["params"], log_lik, _ = em_iteration(state["params"], data, 1.0, args.alpha)
        return log_lik

    times: dict[str, list[float]] = {"latentlm": [], "numpy": []}
    lls: dict[str, list[float]] = {"latentlm": [], "numpy": []}
    for i in range(args.warmup + args.iters):
        # alternate so that machine noise hits both alike
        for name, fn in (("latentlm", ours), ("numpy", peer.iteration)):
            start = time.perf_counter()
            ll = fn()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)
            lls[name].append(ll)
    agree = abs(lls["latentlm"][-1] - lls["numpy"][-1]) <= 1e-4 * abs(lls["numpy"][-1])
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {
        "data": str(args.data), "docs": len(bow), "vocab": bow.vocab_size, "nnz": int(counts.nnz),
        "clusters": args.clusters, "dtype": args.dtype, "threads": args.threads, "iters": args.iters,
        "median_ms": med, "ratio_numpy_over_latentlm": med["numpy"] / med["latentlm"],
        "final_log_likelihood": {k: v[-1] for k, v in lls.items()}, "log_likelihoods_agree": agree,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__},
        "torch_parallel": torch.__config__.parallel_info().splitlines()[:4],
        "blas": blas_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")},
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"M1 EM on {Path(args.data).name}: {len(bow)} docs x {bow.vocab_size} words, nnz {counts.nnz}, "
          f"K={args.clusters}, {args.dtype}, {args.threads} thread(s), {args.iters} timed iterations")
    print("| implementation | median ms / iteration |")
    print("| --- | ---: |")
    print(f"| latentlm (torch CSR) | {med['latentlm']:.2f} |")
    print(f"| scipy.sparse + numpy | {med['numpy']:.2f} |")
    print(f"ratio numpy/latentlm = {result['ratio_numpy_over_latentlm']:.2f}; log-likelihoods agree: {agree}")
    print("env:", json.dumps(result["env"]))
    for lib in result["blas"]:
        print("blas:", json.dumps({k: v for k, v in lib.items() if k != "filepath"}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not agree:
        print("ERROR: the two implementations disagree", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
