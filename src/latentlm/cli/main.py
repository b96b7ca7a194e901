"""``latentlm`` command line: train, evaluate, sample, interpolate, reconstruct, tag, cluster, grid, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentlm.errors import LatentLMError


def _cmd_train(args) -> int:
    from latentlm.config import load_config
    from latentlm.training import train

    config = load_config(args.config, args.set)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    if args.device:
        config.train.device = args.device
    out = args.out or str(Path("runs") / Path(args.config).stem)
    summary = train(config, out, resume=args.resume, progress=None if not args.quiet else False)
    print(json.dumps({"out": out, **summary}))
    return 0


def _load_split(directory: str, split: str, data_dir: str | None, limit: int | None, device: str = "auto"):
    from latentlm.system import load_pretrained
    from latentlm.training import load_corpus

    system, config, vocab = load_pretrained(directory, device=device)
    if data_dir:
        config.data.data_dir = data_dir
    if limit is not None:
        setattr(config.data, f"{split}_limit", limit)
    _, data = load_corpus(config, vocab, splits=(split,))
    return system, config, vocab, data[split]


def _cmd_evaluate(args) -> int:
    from latentlm.evaluation import evaluate

    system, config, _, dataset = _load_split(args.dir, args.split, args.data_dir, args.limit, args.device)
    samples = args.samples if args.samples is not None else config.eval.samples
    result = evaluate(system, dataset, samples=samples, batch_size=config.eval.batch_size,
                      seed=config.eval.seed, progress=not args.json, precision=args.precision)
    result["precision"] = args.precision
    result["split"] = args.split
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("examples", "tokens", "nll", "ppl", "elbo", "kl", "mi", "au"):
            value = result[key]
            print(f"{key:>9}: {value:.3f}" if isinstance(value, float) else f"{key:>9}: {value}")
    return 0


def _cmd_sample(args) -> int:
    import torch

    from latentlm.device import device_generator, module_device
    from latentlm.evaluation import sample_sentences
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir, device=args.device)
    gen = device_generator(args.seed, module_device(system))  # CUDA sampling needs a CUDA generator
    torch.manual_seed(args.seed)
    for line in sample_sentences(system.model, vocab, args.n, greedy=args.greedy, generator=gen):
        print(line)
    return 0


def _needs_posterior(system, what: str):
    if system.posterior is None:
        raise LatentLMError(f"{what} needs a model with a latent variable and an inference network")


def _cmd_interpolate(args) -> int:
    from latentlm.evaluation import interpolate
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir, device=args.device)
    _needs_posterior(system, "interpolate")
    for line in interpolate(system.model, system.posterior, vocab, args.a.split(), args.b.split(), args.steps):
        print(line)
    return 0


def _cmd_reconstruct(args) -> int:
    from latentlm.evaluation import reconstruct
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir, device=args.device)
    _needs_posterior(system, "reconstruct")
    for src, rec in zip(args.sentences, reconstruct(system.model, system.posterior, vocab,
                                                    [s.split() for s in args.sentences])):
        print(f"{src}\n  -> {rec}")
    return 0


def _cmd_tag(args) -> int:
    """Viterbi states of every sentence; gold-tag scores when the file carries tags."""
    from latentlm.data.batching import TextDataset
    from latentlm.data.conll import read_conllu, read_tagged_tsv
    from latentlm.data.corpus import read_lines
    from latentlm.device import module_device
    from latentlm.evaluation.tagging import tagging_scores
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir, device=args.device)
    device = module_device(system)
    model = system.model
    if not hasattr(model, "tag"):
        raise LatentLMError(f"{args.dir} holds a {type(model).__name__}, which does not tag; train an hmm or neural_hmm")
    path = Path(args.data)
    gold = None
    if path.suffix == ".conllu":
        corpus = read_conllu(path, args.tagset)
        sentences, gold = corpus.words, corpus.tags
    elif path.suffix == ".tsv":
        corpus = read_tagged_tsv(path)
        sentences, gold = corpus.words, corpus.tags
    else:
        sentences = read_lines(path).lines
    dataset = TextDataset(sentences, vocab)
    states: list[list[int]] = [[] for _ in sentences]
    for idx in dataset.batch_indices(args.batch_size):
        batch = dataset.make_batch(idx).to(device)
        tags = model.tag(batch).cpu()  # (B, N)
        for row, i in enumerate(idx):
            states[i] = tags[row, : len(sentences[i])].tolist()
    result = {"sentences": len(sentences), "tokens": sum(map(len, sentences))}
    if gold is not None:
        flat_gold = [t for s in gold for t in s]
        flat_pred = [k for s in states for k in s]
        result.update(tagging_scores(flat_pred, flat_gold).as_dict())
    if args.json:
        print(json.dumps({**result, "states": states}))
    else:
        for words, ks in zip(sentences, states):
            print(" ".join(f"{w}/{k}" for w, k in zip(words, ks)))
        if gold is not None:
            print(json.dumps(result), file=sys.stderr)
    return 0


def _cmd_cluster(args) -> int:
    """MAP cluster of every document under a naive-Bayes mixture (M1), fitted first with --fit K."""
    import torch

    from latentlm.config import Config, DataConfig
    from latentlm.data.documents import load_documents
    from latentlm.evaluation.clustering import cluster_documents, kmeans_tfidf, score_assignments
    from latentlm.inference.em import EMConfig, fit_em
    from latentlm.models.nb_mixture import NaiveBayesMixture
    from latentlm.system import System, build_system, load_pretrained
    from latentlm.io import atomic_write_text, save_weights
    from latentlm.inference.exact import ExactMarginal

    out = Path(args.dir)
    if args.fit:
        docs = load_documents(args.data, max_size=args.vocab_size, min_df=args.min_df)
        model = NaiveBayesMixture(docs.vocab_size, args.fit)
        torch.manual_seed(args.seed)
        fit_em(model, docs, EMConfig(anneal=True, smoothing=0.01, restarts=args.restarts, seed=args.seed,
                                     perturbation=0.01))
        config = Config(data=DataConfig(name=str(args.data)), model={"type": "nb_mixture", "num_clusters": args.fit},
                        objective={"type": "exact"})
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", config.to_json())
        docs.vocab.save(out / "vocab.json")
        save_weights(System(model, None, ExactMarginal()), out / "model.safetensors")
    system, _, vocab = load_pretrained(out, device=args.device)  # the --fit above runs on the CPU
    if not isinstance(system.model, NaiveBayesMixture):
        raise LatentLMError(f"{out} holds a {type(system.model).__name__}; `cluster` needs an nb_mixture run")
    docs = load_documents(args.data, vocab=vocab)
    result = cluster_documents(system.model, docs, top_n=args.top)
    if docs.labels is not None:
        km = kmeans_tfidf(docs.counts, result["num_clusters"], seed=args.seed)
        result["kmeans_tfidf"] = {k: v for k, v in score_assignments(docs.labels, km, result["num_clusters"]).items()
                                  if k in ("nmi", "purity")}
    if args.json:
        print(json.dumps(result))
    else:
        for k, words in enumerate(result["top_words"]):
            print(f"cluster {k:>2} ({result['usage']['sizes'][k]:>5} docs): {' '.join(words)}")
        for key in ("nmi", "purity", "perplexity"):
            if key in result:
                print(f"{key}: {result[key]:.3f}")
        if "kmeans_tfidf" in result:
            print(f"k-means on tf-idf: nmi {result['kmeans_tfidf']['nmi']:.3f} purity {result['kmeans_tfidf']['purity']:.3f}")
    return 0


def _cmd_bench(args) -> int:
    from latentlm.report.estimator_study import run_estimator_study

    out = args.out or str(Path(args.dir) / "estimator_study")
    posterior = {"type": args.fresh_posterior} if args.fresh_posterior else None
    rows = run_estimator_study(args.dir, out, batch_size=args.batch_size, draws=args.draws, samples=args.samples,
                               seed=args.seed, progress=True, posterior=posterior)
    print(json.dumps(rows, indent=1, default=float))
    return 0


def _cmd_grid(args) -> int:
    from latentlm.report.grid import run_grid, update_results_file, write_report

    if args.report_only:
        table = write_report(args.out, args.configs)
    else:
        run_grid(args.configs, args.out, seeds=args.seeds, jobs=args.jobs, threads=args.threads,
                 overrides=args.set, test_limit=args.test_limit, samples=args.samples, precision=args.precision,
                 gap_sentences=args.gap_sentences, gap_steps=args.gap_steps, data_dir=args.data_dir,
                 device=args.device)
        table = write_report(args.out, args.configs)
    if args.results:
        note = (Path(args.out) / "grid.md").read_text(encoding="utf-8") if (Path(args.out) / "grid.md").is_file() else table
        update_results_file(args.results, args.name or Path(args.out).name, note)
    print(table)
    return 0


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.5 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--data-dir", help="folder holding the corpus (else $LATENTLM_DATA, else ../shared/data)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", help="shorthand for --set train.device=...: auto | cpu | cuda | cuda:N")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="NLL/PPL, ELBO, KL, MI, AU on a split")
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--samples", type=int, help="importance samples per example (default: config eval.samples)")
    p.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"],
                   help="bf16-mixed: networks under bf16 autocast, normalizers in fp32 (faster IS-k)")
    _device_option(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("sample", help="sentences sampled from the model (from the prior for latent models)")
    p.add_argument("dir")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    _device_option(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("interpolate", help="decode along the line between two sentences' posterior means")
    p.add_argument("dir")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--steps", type=int, default=5)
    _device_option(p)
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser("reconstruct", help="greedy decoding from the posterior mean of each sentence")
    p.add_argument("dir")
    p.add_argument("sentences", nargs="+")
    _device_option(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("tag", help="Viterbi states of each sentence under an HMM run (scores vs gold tags if given)")
    p.add_argument("dir")
    p.add_argument("--data", required=True, help="text (one sentence per line), token<TAB>tag .tsv, or .conllu")
    p.add_argument("--tagset", default="upos", choices=["upos", "xpos"], help="gold tags of a .conllu file")
    p.add_argument("--batch-size", type=int, default=64)
    _device_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tag)

    p = sub.add_parser("cluster", help="MAP cluster of each document under a naive-Bayes mixture (M1)")
    p.add_argument("dir", help="run directory; with --fit K it is created by annealed EM on --data")
    p.add_argument("--data", required=True, help="documents, .jsonl with a 'text' field (and 'label' if known)")
    p.add_argument("--fit", type=int, metavar="K", help="first fit K clusters by annealed EM")
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--min-df", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10)
    _device_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_cluster)

    p = sub.add_parser("grid", help="train and evaluate every config (x seeds) under one budget; one table + plots")
    p.add_argument("configs", nargs="+", help="YAML configs, one table row each")
    p.add_argument("--out", default="runs/grid", help="folder of the runs and the report")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="rows trained at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test sentences")
    p.add_argument("--samples", type=int, help="importance samples per sentence (default: each config's eval.samples)")
    p.add_argument("--precision", default="bf16-mixed", choices=["fp32", "bf16-mixed"], help="evaluation precision")
    p.add_argument("--gap-sentences", type=int, default=100, help="test sentences for the amortization gap (0: skip)")
    p.add_argument("--gap-steps", type=int, default=50, help="per-example optimization steps for the gap")
    p.add_argument("--data-dir")
    p.add_argument("--report-only", action="store_true", help="rebuild table and plots from finished runs")
    p.add_argument("--device", help="train.device for every row's training and evaluation: auto | cpu | cuda | "
                                    "cuda:N (default: each config's own)")
    p.add_argument("--results", help="also write the table into this markdown file between grid markers")
    p.add_argument("--name", help="marker name in --results (default: the --out folder's name)")
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("bench", help="measurements: `latentlm bench estimators DIR` (gradient estimator study)")
    p.add_argument("what", choices=["estimators"])
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="folder for the table and plot (default DIR/estimator_study)")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="samples per draw for the multi-sample estimators")
    p.add_argument("--fresh-posterior", metavar="TYPE",
                   help="study a freshly initialized q of this type (e.g. categorical_lstm) instead of the "
                        "run's own (default for runs trained on the exact marginal, which have none)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LatentLMError as err:
        print(f"latentlm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentlm: interrupted; resume with `latentlm train ... --resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
