"""Factorial HMM (M8): cost of exact inference vs structured mean field as the number of chains grows,
and the gap of the mean-field bound to the exact log p(x) where both run.

One batch of B PTB validation sentences (vocabulary: PTB train, 10k words), K states per chain,
L = 1..--max-exact chains for exact inference (forward algorithm over the K^L product chain,
transition = Kronecker product of the chains', no gradient) and L = 1..--max-chains for
mean field (``--sweeps`` coordinate-ascent sweeps over the chains + the bound F) and for the
amortized posterior (one BiLSTM pass + F, untrained network: a cost, not a gap). The model
is a random one (``--seed``, ``init_scale`` 1.0, dim 64): the gap describes this model, not a
trained one. Each (method, L) runs in its own process so that its peak resident memory (max
RSS after the run minus before it, the batch and model already built) is its own; seconds are
the median of ``--repeats`` calls after one warm-up.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_factorial_hmm.py
    (writes benchmarks/results/factorial_hmm.{json,md,png})
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(method: str, L: int, args) -> dict:
    """Time and measure one (method, L) in this process."""
    from latentlm.config import load_config
    from latentlm.inference.mean_field import (FactorialChainPosterior, chain_bound, coordinate_ascent_bound,
                                               structured_mean_field)
    from latentlm.models.factorial_hmm import FactorialHMM
    from latentlm.training import load_corpus

    torch.set_num_threads(args.threads)
    config = load_config(None, ["data.name=ptb", "data.max_vocab=10000", f"data.valid_limit={args.batch}"])
    vocab, data = load_corpus(config, splits=("valid",))
    batch = data["valid"].make_batch(list(range(args.batch)))
    torch.manual_seed(args.seed)
    model = FactorialHMM(len(vocab), num_chains=L, num_states=args.states, dim=64, init_scale=1.0,
                         max_exact_states=args.states ** args.max_exact, seed=args.seed)
    posterior = FactorialChainPosterior(len(vocab), L * args.states, args.states)

    if method == "exact":
        def run():
            return model.log_marginal(batch)
    elif method == "mean_field":
        def run():
            u, mu = structured_mean_field(model, batch, args.sweeps)
            return coordinate_ascent_bound(model, batch, u, mu)
    else:
        def run():
            return chain_bound(model, batch, posterior(batch))

    before = max_rss_mb()
    times, value = [], None
    with torch.no_grad():
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            value = run()
            if i:  # the first call is a warm-up
                times.append(time.perf_counter() - t0)
    return {"method": method, "L": L, "K": args.states, "seconds": statistics.median(times), "times": times,
            "peak_extra_mb": max_rss_mb() - before, "per_sentence": value.tolist(),
            "tokens": int(batch.lengths.sum()), "B": args.batch, "V": len(vocab)}


def table(rows: list[dict], args) -> str:
    by = {(r["method"], r["L"]): r for r in rows}
    out = ["| L | K^L | exact s | exact MB | mean field s | mean field MB | amortized s | amortized MB | "
           "log p(x) | F (mean field) | gap nats/sentence | gap % |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for L in range(1, args.max_chains + 1):
        ex, mf, am = by.get(("exact", L)), by.get(("mean_field", L)), by.get(("amortized", L))

        def cell(r, key, fmt):
            return format(r[key], fmt) if r is not None else "—"
        lp = f_ = gap = pct = "—"
        if ex is not None and mf is not None:
            e, f = torch.tensor(ex["per_sentence"]), torch.tensor(mf["per_sentence"])
            lp, f_ = f"{float(e.mean()):.2f}", f"{float(f.mean()):.2f}"
            gap = f"{float((e - f).mean()):.3f}"
            pct = f"{float(((e - f) / e.abs()).mean()) * 100:.2f}"
        out.append(f"| {L} | {args.states ** L} | {cell(ex, 'seconds', '.3f')} | {cell(ex, 'peak_extra_mb', '.0f')} | "
                   f"{cell(mf, 'seconds', '.3f')} | {cell(mf, 'peak_extra_mb', '.0f')} | {cell(am, 'seconds', '.3f')} | "
                   f"{cell(am, 'peak_extra_mb', '.0f')} | {lp} | {f_} | {gap} | {pct} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method, style in (("exact", "o-"), ("mean_field", "s-"), ("amortized", "^-")):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["L"])
        a.plot([r["L"] for r in rs], [r["seconds"] for r in rs], style, label=method.replace("_", " "))
    a.set_yscale("log")
    a.set_xlabel(f"chains L (K = {args.states})")
    a.set_ylabel(f"seconds per batch of {args.batch} sentences")
    a.set_title("cost (median, 1 thread, loaded machine)")
    a.legend()
    by = {(r["method"], r["L"]): r for r in rows}
    Ls = [L for L in range(1, args.max_chains + 1) if ("exact", L) in by and ("mean_field", L) in by]
    gaps = [float((torch.tensor(by[("exact", L)]["per_sentence"]) - torch.tensor(by[("mean_field", L)]["per_sentence"])
                   ).mean()) for L in Ls]
    b.plot(Ls, gaps, "s-", color="C1")
    b.set_xlabel(f"chains L (K = {args.states})")
    b.set_ylabel("log p(x) - F, nats per sentence")
    b.set_title(f"mean-field gap ({args.sweeps} sweeps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--states", type=int, default=4)
    p.add_argument("--max-exact", type=int, default=6)
    p.add_argument("--max-chains", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sweeps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args)))
        return
    rows = []
    jobs = [("exact", L) for L in range(1, args.max_exact + 1)]
    jobs += [(m, L) for m in ("mean_field", "amortized") for L in range(1, args.max_chains + 1)]
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "one"]
    for method, L in jobs:
        res = subprocess.run([sys.executable, __file__, *passthrough, "--one", method, str(L)],
                             capture_output=True, text=True, env=os.environ)
        if res.returncode:
            print(f"{method} L={L} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{method:10s} L={L}: {rows[-1]['seconds']:.3f} s, +{rows[-1]['peak_extra_mb']:.0f} MB", flush=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "load_average": os.getloadavg(), "threads": args.threads}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "factorial_hmm.json").write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows},
                                                           indent=1))
    md = table(rows, args)
    (RESULTS / "factorial_hmm.md").write_text(md + "\n")
    plot(rows, RESULTS / "factorial_hmm.png", args)
    print(md)
    print(machine)


if __name__ == "__main__":
    main()
