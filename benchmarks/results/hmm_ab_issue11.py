"""Issue 11 speed check: HEAD's chain engine (before) vs this branch's (after) vs hmmlearn, interleaved.

Each iteration times, in an alternating order, one forward+backward of the old engine, one of
the new engine (both ``emission_scores`` + ``hmm_log_likelihood`` + backward to all three
tables, float32) and one hmmlearn ``CategoricalHMM.score`` (forward only, float64, scaling),
so all three see the same machine load. The old engine is a copy of HEAD's
``latentlm/structured`` renamed to ``oldstructured`` on ``sys.path`` (see the command in
benchmarks/results/hmm.md).
"""
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])  # folder holding oldstructured/
import oldstructured as old  # noqa: E402

import latentlm.structured as new  # noqa: E402

sys.path.insert(0, "benchmarks")
from bench_hmm import hmmlearn_model, make_problem  # noqa: E402

torch.set_num_threads(1)
B, T, V = 64, 30, 10_000
rows = []
for K, n in ((45, 100), (256, 20), (1024, 4)):
    li, lt, lb, obs = make_problem(B, T, V, K)
    hl = hmmlearn_model(li, lt, lb, "scaling")
    X, lengths = obs.reshape(-1, 1).numpy(), [T] * B

    def run(mod):
        a, b, c = (x.detach().requires_grad_() for x in (li, lt, lb))
        mod.hmm_log_likelihood(a, b, mod.emission_scores(c, obs)).sum().backward()

    fns = {"old": lambda: run(old), "new": lambda: run(new), "hmmlearn": lambda: hl.score(X, lengths)}
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    order = list(fns)
    for i in range(n):
        for k in order[i % 3:] + order[: i % 3]:
            t0 = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in ts.items()}
    row = {"K": K, "n": n, "median_s": med, "new_over_old": med["new"] / med["old"],
           "hmmlearn_over_old": med["hmmlearn"] / med["old"], "hmmlearn_over_new": med["hmmlearn"] / med["new"]}
    rows.append(row)
    print(json.dumps(row), flush=True)
if len(sys.argv) > 2:
    with open(sys.argv[2], "w") as f:
        json.dump(rows, f, indent=1)
