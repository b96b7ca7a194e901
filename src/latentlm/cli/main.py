"""``latentlm`` command line: train, evaluate, sample, interpolate, reconstruct."""

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
    out = args.out or str(Path("runs") / Path(args.config).stem)
    summary = train(config, out, resume=args.resume, progress=None if not args.quiet else False)
    print(json.dumps({"out": out, **summary}))
    return 0


def _load_split(directory: str, split: str, data_dir: str | None, limit: int | None):
    from latentlm.system import load_pretrained
    from latentlm.training import load_corpus

    system, config, vocab = load_pretrained(directory)
    if data_dir:
        config.data.data_dir = data_dir
    if limit is not None:
        setattr(config.data, f"{split}_limit", limit)
    _, data = load_corpus(config, vocab, splits=(split,))
    return system, config, vocab, data[split]


def _cmd_evaluate(args) -> int:
    from latentlm.evaluation import evaluate

    system, config, _, dataset = _load_split(args.dir, args.split, args.data_dir, args.limit)
    samples = args.samples if args.samples is not None else config.eval.samples
    result = evaluate(system, dataset, samples=samples, batch_size=config.eval.batch_size,
                      seed=config.eval.seed, progress=not args.json)
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

    from latentlm.evaluation import sample_sentences
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir)
    gen = torch.Generator().manual_seed(args.seed)
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

    system, _, vocab = load_pretrained(args.dir)
    _needs_posterior(system, "interpolate")
    for line in interpolate(system.model, system.posterior, vocab, args.a.split(), args.b.split(), args.steps):
        print(line)
    return 0


def _cmd_reconstruct(args) -> int:
    from latentlm.evaluation import reconstruct
    from latentlm.system import load_pretrained

    system, _, vocab = load_pretrained(args.dir)
    _needs_posterior(system, "reconstruct")
    for src, rec in zip(args.sentences, reconstruct(system.model, system.posterior, vocab,
                                                    [s.split() for s in args.sentences])):
        print(f"{src}\n  -> {rec}")
    return 0


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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="NLL/PPL, ELBO, KL, MI, AU on a split")
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--samples", type=int, help="importance samples per example (default: config eval.samples)")
    p.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("sample", help="sentences sampled from the model (from the prior for latent models)")
    p.add_argument("dir")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("interpolate", help="decode along the line between two sentences' posterior means")
    p.add_argument("dir")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--steps", type=int, default=5)
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser("reconstruct", help="greedy decoding from the posterior mean of each sentence")
    p.add_argument("dir")
    p.add_argument("sentences", nargs="+")
    p.set_defaults(func=_cmd_reconstruct)
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
