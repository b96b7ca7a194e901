"""Cluster 20 Newsgroups (or BBC) with M1 by EM and with k-means on tf-idf, in one run.

For each seed, with ``--restarts`` restarts each chosen by the training objective
(never the labels):

- ``em``: M1 by textbook EM from random responsibilities;
- ``annealed``: M1 by deterministically annealed EM (beta from ``--beta-start`` to 1);
- ``rescaled``: a *model change* — every document rescaled to length^g tokens
  (``--rescale-power g``, fractional counts, i.e. a per-document likelihood temperature
  length^(g-1)) — then annealed EM from ``--rescaled-beta-start``;
- ``kmeans``: scikit-learn k-means on tf-idf of the same count matrix.

Prints NMI and purity per seed and mean ± std as a Markdown table (and ``--json``).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/cluster_20news.py \
        --data ../shared/data/docs/20news-bydate.test.jsonl --clusters 20 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentlm.data.documents import load_documents, rescale_lengths
from latentlm.evaluation.clustering import cluster_documents, kmeans_tfidf, score_assignments
from latentlm.inference.em import EMConfig, EMData, fit_em
from latentlm.models.nb_mixture import NaiveBayesMixture

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "docs" / "20news-bydate.test.jsonl"


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="labelled documents whose clusters are scored")
    p.add_argument("--fit-data", help="fit on these documents instead (e.g. the train split; labels unused) "
                                      "and score the MAP clusters of --data")
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--min-df", type=int, default=3)
    p.add_argument("--smoothing", type=float, default=0.01)
    p.add_argument("--beta-start", type=float, default=0.002)
    p.add_argument("--beta-growth", type=float, default=1.1)
    p.add_argument("--iters-per-beta", type=int, default=10)
    p.add_argument("--perturbation", type=float, default=0.1)
    p.add_argument("--anneal-length-power", type=float, default=1.0,
                   help="length-aware annealing path (EMConfig.length_power); 1 = one beta for all")
    p.add_argument("--rescale-power", type=float, default=0.5, help="model change of the 'rescaled' method")
    p.add_argument("--rescaled-beta-start", type=float, default=0.01)
    p.add_argument("--methods", nargs="+", default=["em", "annealed", "rescaled", "kmeans"],
                   choices=["em", "annealed", "rescaled", "kmeans"])
    p.add_argument("--kmeans-n-init", type=int, default=10)
    p.add_argument("--top-words", type=int, default=8)
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    start = time.perf_counter()
    bow = load_documents(args.data, max_size=args.vocab_size, min_df=args.min_df)
    scored = bow  # the documents whose MAP clusters are scored against their labels
    if args.fit_data:
        # Fit on another split (e.g. train), vocabulary from it; score --data's documents.
        bow = load_documents(args.fit_data, max_size=args.vocab_size, min_df=args.min_df)
        scored = load_documents(args.data, vocab=bow.vocab)
    if scored.labels is None:
        raise SystemExit(f"{args.data}: documents have no labels; NMI and purity need them")
    datasets = {"em": bow, "annealed": bow, "rescaled": rescale_lengths(bow, power=args.rescale_power)}
    em_data = {"em": EMData(bow)}
    em_data["annealed"] = em_data["em"]
    if "rescaled" in args.methods:
        em_data["rescaled"] = EMData(datasets["rescaled"])
    print(f"fit on {Path(args.fit_data or args.data).name}: {len(bow)} docs, {bow.vocab_size - 4} words, {bow.num_tokens} tokens, "
          f"{int((bow.lengths == 0).sum())} empty after preprocessing; K={args.clusters}; "
          f"load {time.perf_counter() - start:.1f}s" + (f"; scored: {Path(args.data).name}, {len(scored)} docs"
                                                         if args.fit_data else ""), flush=True)

    base = dict(smoothing=args.smoothing, restarts=args.restarts)
    anneal = dict(anneal=True, beta_growth=args.beta_growth, iters_per_beta=args.iters_per_beta,
                  perturbation=args.perturbation)
    configs = {
        "em": EMConfig(**base, max_iters=500),
        "annealed": EMConfig(**base, **anneal, beta_start=args.beta_start, length_power=args.anneal_length_power),
        "rescaled": EMConfig(**base, **anneal, beta_start=args.rescaled_beta_start),
    }
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            t0 = time.perf_counter()
            record: dict = {"seed": seed}
            if method == "kmeans":
                assign = kmeans_tfidf(bow.counts, args.clusters, seed=seed, n_init=args.kmeans_n_init,
                                      predict=scored.counts if args.fit_data else None)
            else:
                config = configs[method]
                config.seed = seed
                model = NaiveBayesMixture(bow.vocab_size, args.clusters)
                result = fit_em(model, em_data[method], config)
                target = datasets[method] if not args.fit_data else (
                    scored if method != "rescaled" else rescale_lengths(scored, power=args.rescale_power))
                report = cluster_documents(model, target, top_n=args.top_words)
                assign = np.asarray(report["assignments"])
                record.update(log_likelihood=result.log_likelihood, objective=result.objective,
                              restart_objectives=result.restart_objectives, best_restart=result.best_restart,
                              iterations=result.iterations, top_words=report["top_words"])
            record.update(score_assignments(scored.labels, assign, args.clusters))
            record["seconds"] = time.perf_counter() - t0
            runs[method].append(record)
            print(f"seed {seed} {method:9s} NMI {record['nmi']:.3f} purity {record['purity']:.3f} "
                  f"used {record['usage']['used']:2d} {record['seconds']:.1f}s", flush=True)

    names = {"em": "M1, EM from random responsibilities", "annealed": "M1, annealed EM",
             "rescaled": f"M1 on length^{args.rescale_power} rescaled counts (model change), annealed EM",
             "kmeans": "k-means on tf-idf (scikit-learn)"}
    print()
    print("| method | NMI | purity | clusters used | seconds/seed |")
    print("| --- | --- | --- | --- | ---: |")
    summary = {}
    for method, recs in runs.items():
        nmis, purs = [r["nmi"] for r in recs], [r["purity"] for r in recs]
        used = [r["usage"]["used"] for r in recs]
        secs = np.mean([r["seconds"] for r in recs])
        summary[method] = {"nmi_mean": float(np.mean(nmis)), "nmi_std": float(np.std(nmis)),
                           "purity_mean": float(np.mean(purs)), "purity_std": float(np.std(purs))}
        print(f"| {names[method]} | {mean_std(nmis)} | {mean_std(purs)} | {np.mean(used):.1f} | {secs:.1f} |")
    for method in ("annealed", "rescaled"):
        if method in runs:
            print(f"\nTop words per cluster ({method}, seed {args.seeds[0]}):")
            for k, words in enumerate(runs[method][0]["top_words"]):
                print(f"  {k:2d}: {' '.join(words)}")
    out = {"args": vars(args), "command": " ".join(sys.argv), "summary": summary, "runs": runs,
           "seconds": time.perf_counter() - start}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
