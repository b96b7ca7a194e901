"""Baum-Welch seconds per iteration on the treebank sample: latentlm HMM vs hmmlearn.

Both run EM with K states on all 3,914 sentences (94,084 tokens) of
``shared/data/pos/treebank_wsj_sample.tsv``. hmmlearn's ``CategoricalHMM.fit`` is timed over
``--hmmlearn-iters`` iterations (its E-step is C++, its M-step numpy); ours over ``--iters``.
The median of per-iteration times is reported for ours; hmmlearn's total / iterations.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 \
        .venv/bin/python benchmarks/bench_baum_welch.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from latentlm.data.batching import TextDataset
from latentlm.data.conll import read_tagged_tsv
from latentlm.data.vocab import Vocab
from latentlm.models.hmm import HMM

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pos" / "treebank_wsj_sample.tsv"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--K", type=int, default=45)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--hmmlearn-iters", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(args.threads)
    corpus = read_tagged_tsv(args.data)
    vocab = Vocab.build(corpus.words)
    data = TextDataset(corpus.words, vocab)
    batches = list(data.batches(args.batch_size))

    model = HMM(len(vocab), args.K, seed=0)
    times = []
    lls = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        lls.append(model.em_step(batches))
        times.append(time.perf_counter() - t0)
    ours = statistics.median(times)

    from hmmlearn import hmm

    X = np.concatenate([np.array(vocab.encode(s)) for s in corpus.words]).reshape(-1, 1)
    lengths = [len(s) for s in corpus.words]
    m = hmm.CategoricalHMM(n_components=args.K, n_iter=args.hmmlearn_iters, tol=-np.inf, random_state=0,
                           n_features=len(vocab))
    t0 = time.perf_counter()
    m.fit(X, lengths)
    theirs = (time.perf_counter() - t0) / m.monitor_.iter
    result = {
        "K": args.K, "sentences": len(data), "tokens": int(sum(lengths)), "threads": args.threads,
        "ours_seconds_per_iter": ours, "ours_iter_times": times,
        "hmmlearn_seconds_per_iter": theirs, "hmmlearn_iters": m.monitor_.iter, "hmmlearn_implementation": m.implementation,
        "speedup": theirs / ours,
        "blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")} for d in threadpool_info()],
        "ours_log_likelihoods": lls,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
