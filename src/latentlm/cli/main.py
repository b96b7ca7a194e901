"""``latentlm`` command line: train, evaluate, sample, interpolate, reconstruct, tag, segment, cluster, grid, report,
bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentlm.errors import ConfigError, LatentLMError


def _cmd_train(args) -> int:
    from latentlm.config import load_config
    from latentlm.training import train

    config = load_config(args.config, args.set)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    if args.device:
        config.train.device = args.device
    out = args.out or str(Path("runs") / Path(args.config).stem)
    import torch.distributed as dist

    try:
        summary = train(config, out, resume=args.resume, progress=None if not args.quiet else False)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        # Under torchrun: every rank reaches this barrier, then the process group is torn down
        # before the interpreter exits (a live gloo group at exit can abort with std::terminate).
        dist.barrier()
        dist.destroy_process_group()
    print(json.dumps({"out": out, **summary}))
    return 0


def _load_split(directory: str, split: str, data_dir: str | None, limit: int | None, device: str = "auto"):
    from latentlm.system import load_pretrained
    from latentlm.training import load_corpus

    system, config, vocab = load_pretrained(directory, device=device)
    if data_dir:
        config.data.data_dir = data_dir
    # the whole split unless --limit: the training config's {split}_limit (a tiny config's 60
    # test sentences) is a training-time choice, not the evaluation's
    setattr(config.data, f"{split}_limit", limit)
    _, data = load_corpus(config, vocab, splits=(split,))
    return system, config, vocab, data[split]


def _cmd_evaluate(args) -> int:
    from latentlm.evaluation import evaluate

    system, config, vocab, dataset = _load_split(args.dir, args.split, args.data_dir, args.limit, args.device)
    samples = args.samples if args.samples is not None else config.eval.samples
    from latentlm.models.alignment import AttentionTranslator

    beam = args.beam if args.beam is not None else config.eval.beam
    result = evaluate(system, dataset, samples=samples, batch_size=config.eval.batch_size,
                      seed=config.eval.seed, progress=not args.json, precision=args.precision, beam=beam,
                      max_decode_len=config.eval.max_decode_len)
    result["precision"] = args.precision
    result["split"] = args.split
    if isinstance(system.model, AttentionTranslator) and not args.no_figures:
        from latentlm.report.alignment import write_alignment_figures

        figures = write_alignment_figures(system, dataset, Path(args.dir) / "figures")
        result["figures"] = [str(f) for f in figures]
    if args.topics:
        result.update(_topics(system, config, vocab, args.topics))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"scored {result.get('examples', len(dataset))} examples of the {args.split} split"
              + (f" (--limit {args.limit})" if args.limit is not None else " (all of it)"), file=sys.stderr)
        for key in ("examples", "tokens", "nll", "ppl", "elbo", "ppl_bound", "kl", "mi", "au", "npmi_mean", "bleu",
                    "bleu_signature", "decode_s"):
            if key not in result:
                continue
            value = result[key]
            print(f"{key:>9}: {value:.3f}" if isinstance(value, float) else f"{key:>9}: {value}")
    return 0


def _cmd_translate(args) -> int:
    from latentlm.data.corpus import read_utf8
    from latentlm.evaluation.translation import translate_sentences
    from latentlm.io import atomic_write_text
    from latentlm.models.base import ConditionalGenerator
    from latentlm.system import load_pretrained

    system, config, vocab = load_pretrained(args.dir, device=args.device)
    if not isinstance(system.model, ConditionalGenerator) or vocab.source is None:
        raise ConfigError(f"{args.dir}: model {config.model['type']!r} does not translate (train an "
                          f"attention_translator on data.format: parallel)")
    _, text = read_utf8(args.input)  # CorpusError naming the line of a non-UTF-8 byte or a control character
    lines = text.splitlines()
    sentences = [[w.lower() for w in line.split()] if config.data.lowercase else line.split() for line in lines]
    beam = args.beam if args.beam is not None else config.eval.beam
    out = translate_sentences(system, sentences, vocab, beam=max(1, beam), batch_size=config.eval.batch_size,
                              max_len=args.max_len or config.eval.max_decode_len, progress=args.output is not None)
    result = "".join(" ".join(words) + "\n" for words in out)
    if args.output:
        atomic_write_text(Path(args.output), result)
        print(f"translated {len(lines)} lines into {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(result)
    return 0


def _topics(system, config, vocab, n: int) -> dict:
    """Each topic's top ``n`` words and their NPMI coherence on the run's training documents (M10)."""
    from latentlm.data.loading import load_corpus
    from latentlm.models.topic_model import NeuralTopicModel, npmi_coherence

    if not isinstance(system.model, NeuralTopicModel):
        raise LatentLMError(f"--topics needs a topic_model run, not {type(system.model).__name__}")
    train = load_corpus(config.data, vocab, splits=("train",), seed=config.seed)[1]["train"]
    top = system.model.top_words(n)  # (K, n)
    npmi = npmi_coherence(top, train.counts)
    return {"npmi_mean": float(npmi.mean()),
            "topics": [{"words": [vocab.itos[i] for i in row.tolist()], "npmi": float(v)} for row, v in zip(top, npmi)]}


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


def _generator(system, seed: int):
    from latentlm.device import device_generator, module_device

    return device_generator(seed, module_device(system))


def _needs_posterior(system, what: str):
    if system.posterior is None:
        raise LatentLMError(f"{what} needs a model with a latent variable and an inference network")


def _cmd_interpolate(args) -> int:
    from latentlm.evaluation import interpolate
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir, device=args.device)
    _needs_posterior(system, "interpolate")
    gen = _generator(system, args.seed)
    for line in interpolate(system.model, system.posterior, vocab, args.a.split(), args.b.split(), args.steps,
                            max_len=args.max_len, greedy=not args.sample, generator=gen):
        print(line)
    return 0


def _cmd_reconstruct(args) -> int:
    from latentlm.evaluation import reconstruct
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir, device=args.device)
    _needs_posterior(system, "reconstruct")
    for src, rec in zip(args.sentences, reconstruct(system.model, system.posterior, vocab,
                                                    [s.split() for s in args.sentences], max_len=args.max_len,
                                                    greedy=not args.sample, generator=_generator(system, args.seed))):
        print(f"{src}\n  -> {rec}")
    return 0


def _tagging_data(args, config, vocab):
    """The sentences (and gold tags, or None) ``tag`` scores: ``--data FILE``, else the run's split."""
    from latentlm.data.batching import TextDataset
    from latentlm.data.conll import read_conllu, read_tagged_tsv
    from latentlm.data.corpus import read_lines
    from latentlm.data.loading import TaggedDataset, load_corpus

    if args.data:
        path = Path(args.data)
        if path.suffix in (".conllu", ".tsv"):
            corpus = read_conllu(path, args.tagset or config.data.tagset) if path.suffix == ".conllu" \
                else read_tagged_tsv(path)
            words = [[w.lower() for w in s] for s in corpus.words] if config.data.lowercase else corpus.words
            return TaggedDataset(words, vocab, corpus.tags)
        return TextDataset(read_lines(path).lines, vocab)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    if args.tagset:
        config.data.tagset = args.tagset
    return load_corpus(config.data, vocab, splits=(args.split,), seed=config.seed)[1][args.split]


def _cmd_tag(args) -> int:
    """Viterbi states of every sentence; many-to-one, one-to-one and V-measure when gold tags are known."""
    from latentlm.data.loading import TaggedDataset
    from latentlm.device import module_device
    from latentlm.evaluation.tagging import tagging_scores
    import torch

    from latentlm.inference.base import StructuredPosterior
    from latentlm.models.hmm import HMMBase
    from latentlm.structured import LinearChainCRF
    from latentlm.system import load_pretrained

    system, config, vocab = load_pretrained(args.dir, device=args.device)
    device = module_device(system)
    model = system.model
    if not (isinstance(model, HMMBase) or isinstance(system.posterior, StructuredPosterior)):
        raise LatentLMError(f"{args.dir} holds a {type(model).__name__} without a chain posterior, which does not "
                            f"tag; train an hmm, neural_hmm or lstm_tag_chain")
    dataset = _tagging_data(args, config, vocab)
    states: list[list[int]] = [[] for _ in range(len(dataset))]
    for idx in dataset.batch_indices(args.batch_size):
        batch = dataset.make_batch(idx).to(device)
        if isinstance(model, HMMBase):  # Viterbi under the model's exact posterior
            tags = model.tag(batch).cpu()  # (B, N)
        else:  # Viterbi under the amortized q(z | x) (M7: p(z | x) has no chain form)
            with torch.no_grad():
                q = system.posterior(batch)
            if not isinstance(q, LinearChainCRF):
                raise LatentLMError(f"{args.dir}: posterior {type(q).__name__} is not a chain; cannot tag")
            tags = q.argmax.cpu()  # (B, N)
        n = (batch.lengths - 1).tolist()
        for row, i in enumerate(idx):
            states[i] = tags[row, : n[row]].tolist()
    result = {"sentences": len(dataset), "tokens": sum(map(len, states))}
    gold = dataset.tags if isinstance(dataset, TaggedDataset) else None
    if gold is not None:
        result.update(tagging_scores(states, gold).as_dict())
        result["states_used"] = len({k for s in states for k in s})
    if args.json:
        print(json.dumps({**result, **({"states": states} if args.states else {})}))
    else:
        if args.states:
            for i, ks in enumerate(states):
                print(" ".join(f"{vocab.itos[w]}/{k}" for w, k in zip(dataset.examples[i][1:-1].tolist(), ks)))
        print(json.dumps(result))
    return 0


def _cmd_segment(args) -> int:
    """Viterbi segmentations of a hidden semi-Markov model run: ``[w w w]/k`` per segment."""
    from latentlm.device import module_device
    from latentlm.models.hsmm import NeuralHSMM
    from latentlm.system import load_pretrained

    system, config, vocab = load_pretrained(args.dir, device=args.device)
    model = system.model
    if not isinstance(model, NeuralHSMM):
        raise LatentLMError(f"{args.dir} holds a {type(model).__name__}, which does not segment; train a neural_hsmm")
    dataset = _tagging_data(args, config, vocab)
    shown = range(min(args.n, len(dataset))) if args.n else range(len(dataset))
    lines = []
    for i0 in range(0, len(shown), args.batch_size):
        idx = list(shown[i0 : i0 + args.batch_size])
        batch = dataset.make_batch(idx).to(module_device(system))
        states, durations = (x.cpu() for x in model.segment(batch))
        for row, i in enumerate(idx):
            words = [vocab.itos[w] for w in dataset.examples[i][1:-1].tolist()]
            segs = [(t, int(durations[row, t]), int(states[row, t])) for t in range(len(words)) if durations[row, t] > 0]
            lines.append({"segments": [[" ".join(words[t : t + d]), k] for t, d, k in segs]})
    for line in lines:
        print(json.dumps(line) if args.json else " ".join(f"[{w}]/{k}" for w, k in line["segments"]))
    return 0


def _final_training_objective(run: Path) -> float:
    """The last EM objective (log p(X) + log p(theta), nats per example) in a run's metrics.csv."""
    import csv

    path = run / "metrics.csv"
    rows = [r for r in csv.DictReader(path.open())] if path.is_file() else []
    rows = [r for r in rows if r["split"] == "e_step"]
    if not rows:
        raise LatentLMError(f"{run}: no EM epochs in metrics.csv; several runs are compared by their EM objective")
    return -float(rows[-1]["loss"])


def _cmd_cluster(args) -> int:
    """Score the MAP clusters of a trained naive-Bayes mixture (M1): NMI, purity, top words.

    With several runs (restarts, e.g. seeds), the one with the highest final training
    objective is scored; labels never choose.
    """
    from latentlm.data.documents import load_documents
    from latentlm.data.loading import load_corpus
    from latentlm.evaluation.clustering import cluster_documents, kmeans_tfidf, score_assignments
    from latentlm.models.nb_mixture import NaiveBayesMixture
    from latentlm.system import load_pretrained

    runs = [Path(d) for d in args.dirs]
    objectives = {str(r): _final_training_objective(r) for r in runs} if len(runs) > 1 else {}
    chosen = max(runs, key=lambda r: objectives[str(r)]) if objectives else runs[0]
    system, config, vocab = load_pretrained(chosen, device=args.device)
    if not isinstance(system.model, NaiveBayesMixture):
        raise LatentLMError(f"{chosen} holds a {type(system.model).__name__}; `cluster` needs an nb_mixture run")
    if args.data:
        docs = load_documents(args.data, vocab=vocab)
    else:
        if args.data_dir:
            config.data.data_dir = args.data_dir
        docs = load_corpus(config.data, vocab, splits=(args.split,), seed=config.seed)[1][args.split]
    result = cluster_documents(system.model, docs, top_n=args.top)
    result["run"] = str(chosen)
    if objectives:
        result["training_objectives"] = objectives
    if args.kmeans and docs.labels is not None:
        km = kmeans_tfidf(docs.counts, result["num_clusters"], seed=args.seed, n_init=args.kmeans_n_init)
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
        print(f"run: {chosen}")
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
    from latentlm.report.document import build_report
    from latentlm.report.grid import row_names, run_grid, settings, update_results_file, write_report

    if args.reference and not any(args.reference in row_names(c) for c in args.configs):
        raise ConfigError(f"grid --reference {args.reference!r} names none of the configs given")
    if args.reference or args.goal:
        settings(args.out, args.reference, args.goal)  # checked (and saved for redraws) before any training
    try:
        if not args.report_only:
            run_grid(args.configs, args.out, seeds=args.seeds, jobs=args.jobs, threads=args.threads,
                     overrides=args.set, test_limit=args.test_limit, samples=args.samples, precision=args.precision,
                     gap_sentences=args.gap_sentences, gap_steps=args.gap_steps, data_dir=args.data_dir,
                     device=args.device, backend=args.backend, address=args.address,
                     cpus_per_task=args.cpus_per_task)
    finally:  # failed rows too: the report says which and why
        table = write_report(args.out, args.configs, reference=args.reference, goal=args.goal)
        if Path(args.out).is_dir():
            print(f"[grid] report: {build_report([args.out], args.out)}", file=sys.stderr)
    if args.results:
        note = (Path(args.out) / "grid.md").read_text(encoding="utf-8") if (Path(args.out) / "grid.md").is_file() else table
        update_results_file(args.results, args.name or Path(args.out).name, note)
    print(table)
    return 0


def _cmd_report(args) -> int:
    from latentlm.report.document import build_report

    sources = [Path(d) for d in args.dirs]
    out = Path(args.out) if args.out else (sources[0] if len(sources) == 1 else Path("report"))
    page = build_report(sources, out)
    print(f"report: {page} (and {page.with_suffix('.md')})")
    return 0


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N (default auto)")


def _decoding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample", action="store_true", help="sample each word instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--max-len", type=int, help="cut a decoding after N tokens (default: twice the longest input + 5, "
                                               "at most 50); it stops at </s> anyway")


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
    p.add_argument("--limit", type=int, help="evaluate on the first N examples only (default: the whole split)")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"],
                   help="bf16-mixed: networks under bf16 autocast, normalizers in fp32 (faster IS-k)")
    _device_option(p)
    p.add_argument("--topics", type=int, metavar="N",
                   help="topic models: each topic's top N words and their NPMI on the training documents")
    p.add_argument("--beam", type=int, help="translation models: beam size for BLEU (default: config eval.beam; 0: "
                                            "no decoding)")
    p.add_argument("--no-figures", action="store_true",
                   help="translation models: do not write alignment heatmaps into RUN/figures/")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("translate", help="translate a file, one tokenized sentence a line (translation models)")
    p.add_argument("dir")
    p.add_argument("--input", required=True, help="UTF-8 text, one source sentence a line (empty lines stay empty)")
    p.add_argument("--output", help="write here (atomically) instead of standard output")
    p.add_argument("--beam", type=int, help="beam size (default: config eval.beam; 1: greedy)")
    p.add_argument("--max-len", type=int, help="longest translation in tokens (default: config eval.max_decode_len)")
    _device_option(p)
    p.set_defaults(func=_cmd_translate)

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
    _decoding_options(p)
    _device_option(p)
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser("reconstruct", help="greedy decoding from the posterior mean of each sentence")
    p.add_argument("dir")
    p.add_argument("sentences", nargs="+")
    _decoding_options(p)
    _device_option(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("tag", help="tag sentences with the Viterbi states of an HMM run (or of q for lstm_tag_chain); M-1, 1-1, V-measure vs gold tags")
    p.add_argument("dir")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"],
                   help="split of the run's data (default train: tag induction scores the sentences it fit)")
    p.add_argument("--data", help="another file instead: text (one sentence per line), token<TAB>tag .tsv, or .conllu")
    p.add_argument("--data-dir")
    p.add_argument("--tagset", choices=["upos", "xpos"], help="gold tags of a .conllu file (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--states", action="store_true", help="also print every sentence's states")
    _device_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tag)

    p = sub.add_parser("segment", help="Viterbi segmentations of a hidden semi-Markov model (neural_hsmm) run")
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--data", help="another file instead: text (one sentence per line)")
    p.add_argument("--data-dir")
    p.add_argument("--tagset", choices=["upos", "xpos"], help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, default=10, help="first N sentences (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    _device_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("cluster", help="score a naive-Bayes mixture (M1) run's clusters: NMI, purity, top words")
    p.add_argument("dirs", nargs="+", metavar="RUN",
                   help="run directory; several (restarts): the one with the best final training objective is scored")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split of the run's data")
    p.add_argument("--data", help="another .jsonl document file instead (read with the run's vocabulary)")
    p.add_argument("--data-dir")
    p.add_argument("--kmeans", action="store_true", help="also k-means on tf-idf of the same counts (the baseline)")
    p.add_argument("--kmeans-n-init", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--top", type=int, default=10)
    _device_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_cluster)

    p = sub.add_parser("grid", help="train and evaluate every config (x seeds) under one budget; one table + plots")
    p.add_argument("configs", nargs="+", help="YAML configs, one table row each")
    p.add_argument("--out", default="runs/grid", help="folder of the runs and the report")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="rows trained at once, each in its own process")
    p.add_argument("--backend", default="process", choices=["process", "ray"],
                   help="process: a local process pool of --jobs (default); ray: each config x seed a Ray task "
                        "(pip install 'latentlm[ray]')")
    p.add_argument("--address", help="--backend ray: address of a running Ray cluster (default: start a local one)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="--backend ray: CPUs reserved per task")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (and per Ray task)")
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
    p.add_argument("--reference", help="a row (config stem or label, e.g. 00_lm): adds each row's NLL minus its, "
                                       "paired by seed")
    p.add_argument("--goal", help="what a row must show, on its means, e.g. 'kl>=5,mi>=2,au>=10,nll<=ref' "
                                  "('ref': the --reference row's mean); adds a goal column")
    p.add_argument("--results", help="also write the table into this markdown file between grid markers")
    p.add_argument("--name", help="marker name in --results (default: the --out folder's name)")
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("report", help="report.md + self-contained report.html about runs and grids")
    p.add_argument("dirs", nargs="+", metavar="RUN_OR_GRID_DIR",
                   help="a run folder, a grid folder (latentlm grid --out), a folder of run folders, or a "
                        "folder holding an estimator study (latentlm bench estimators --out)")
    p.add_argument("--out", help="folder for report.md, report.html and figures/ (default: the one folder given, "
                                 "else ./report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="measurements: `latentlm bench estimators DIR` (gradient estimator study)")
    p.add_argument("what", choices=["estimators"])
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="folder for the table, plot and estimator_study.json, which "
                                                  "`latentlm report` reads (default DIR/estimator_study)")
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
