"""E4: unsupervised part-of-speech induction with HMMs (Baum-Welch) and neural HMMs.

Trains on the words of a tagged corpus (gold tags are never seen in training), tags every
sentence with the Viterbi path and scores the states against the gold tags: many-to-one,
one-to-one (Hungarian) and V-measure, plus the per-token NLL / perplexity (``</s>``
counted). As is standard for the task, the model is trained and evaluated on the same
sentences. Results for each seed go to a JSON lines file; the summary prints mean ± std.

    python scripts/pos_induction.py --model hmm --seeds 0 1 2 --iterations 500
    python scripts/pos_induction.py --model neural --char-cnn --seeds 0 1 2 --epochs 30
    python scripts/pos_induction.py --model neural --char-cnn --gem --iterations 200 --m-steps 10
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from latentlm.data.batching import TextDataset
from latentlm.data.conll import read_conllu, read_tagged_tsv
from latentlm.data.corpus import read_lines
from latentlm.data.vocab import Vocab
from latentlm.evaluation.tagging import tagging_scores
from latentlm.models.hmm import HMM, BaumWelchConfig, HMMBase, fit_baum_welch
from latentlm.models.neural_hmm import NeuralHMM, fit_generalized_em

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pos" / "treebank_wsj_sample.tsv"


def load(path: Path, tagset: str, lowercase: bool):
    """(sentences, gold tags or None): .conllu, token<TAB>tag .tsv, or plain text (no tags)."""
    if path.suffix in (".conllu", ".tsv"):
        corpus = read_conllu(path, tagset) if path.suffix == ".conllu" else read_tagged_tsv(path)
        words, tags = corpus.words, corpus.tags
    else:
        words, tags = read_lines(path).lines, None
    words = [[w.lower() for w in s] for s in words] if lowercase else words
    return words, tags


@torch.no_grad()
def evaluate(model: HMMBase, data: TextDataset, gold: list[list[str]] | None, batch_size: int = 512,
             extra_gold: dict[str, list[list[str]]] | None = None) -> dict:
    """Per-token NLL / perplexity, and with ``gold`` the tagging scores (``extra_gold``: other tag
    sets of the same words, e.g. UPOS, scored too with their name as a key prefix)."""
    model.eval()
    predicted: list[list[int]] = [[] for _ in range(len(data))]
    total, tokens = 0.0, 0
    for batch in data.batches(batch_size):
        total += float(model.log_marginal(batch).sum(dtype=torch.float64))
        tokens += batch.num_tokens
        if gold is None:
            continue
        tags = model.tag(batch)
        n = (batch.lengths - 1).tolist()
        for row, i in enumerate(batch.index.tolist()):
            predicted[i] = tags[row, : n[row]].tolist()
    scores = tagging_scores(predicted, gold).as_dict() if gold is not None else {}
    if gold is not None:
        for name, other in (extra_gold or {}).items():
            scores.update({f"{name}_{k}": v for k, v in tagging_scores(predicted, other).as_dict().items()})
    scores["nll_per_token"] = -total / tokens
    scores["perplexity"] = math.exp(-total / tokens)
    if gold is not None:
        scores["states_used"] = len({t for s in predicted for t in s})
    return scores


def run_hmm(args, data: TextDataset, gold, seed: int, extra_gold=None) -> tuple[HMMBase, dict]:
    torch.manual_seed(seed)
    model = HMM(len(data.vocab), args.states, init_scale=args.init_scale, seed=seed).to(torch.float64 if args.double else torch.float32)
    batches = list(data.batches(args.batch_size))
    config = BaumWelchConfig(iterations=args.iterations, smoothing=args.smoothing, emit_smoothing=args.emit_smoothing,
                             log_every=args.log_every)
    result = fit_baum_welch(model, batches, config)
    out = evaluate(model, data, gold, extra_gold=extra_gold)
    out.update(iterations=result.iterations, seconds_per_iteration=result.seconds_per_iteration,
               final_train_log_likelihood=result.log_likelihoods[-1])
    return model, out


def run_neural(args, data: TextDataset, gold, seed: int, extra_gold=None) -> tuple[HMMBase, dict]:
    torch.manual_seed(seed)
    model = NeuralHMM(len(data.vocab), args.states, dim=args.dim, char_cnn=args.char_cnn, words=data.vocab.itos,
                      word_embeddings=not args.no_word_emb, dropout=args.dropout,
                      char_options={"filters": args.char_filters, "widths": tuple(args.char_widths),
                                    "char_dim": args.char_dim})
    if args.gem:
        batches = list(data.batches(args.batch_size))

        def report(it: int, total: float) -> None:
            if args.log_every and (it + 1) % args.log_every == 0 and args.eval_every_log:
                s = evaluate(model, data, gold, extra_gold=extra_gold)
                print(f"iter {it + 1}: m-1 {s['many_to_one']:.4f} 1-1 {s['one_to_one']:.4f} "
                      f"vm {s['v_measure']:.4f}", flush=True)

        result = fit_generalized_em(model, batches, args.iterations, args.m_steps, args.lr, args.log_every, report)
        out = evaluate(model, data, gold, extra_gold=extra_gold)
        out.update(iterations=result.iterations, seconds_per_iteration=result.seconds_per_iteration,
                   final_train_log_likelihood=result.log_likelihoods[-1], m_steps=args.m_steps, dim=args.dim,
                   char_cnn=args.char_cnn)
        return model, out
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        total, tokens = 0.0, 0
        for batch in data.batches(args.batch_size, shuffle=True, seed=seed, epoch=epoch):
            loss = -model.log_marginal(batch).sum() / batch.num_tokens
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            total += float(loss.detach()) * batch.num_tokens
            tokens += batch.num_tokens
        if args.log_every and (epoch + 1) % args.log_every == 0:
            msg = f"epoch {epoch + 1}: train nll/token {total / tokens:.4f}"
            if args.eval_every_log:
                s = evaluate(model, data, gold, extra_gold=extra_gold)
                msg += f"  m-1 {s['many_to_one']:.4f} 1-1 {s['one_to_one']:.4f} vm {s['v_measure']:.4f}"
            print(msg, flush=True)
    out = evaluate(model, data, gold, extra_gold=extra_gold)
    out.update(epochs=args.epochs, seconds=time.perf_counter() - start, steps=step)
    return model, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="token<TAB>tag .tsv, UD .conllu, or plain text (then NLL / perplexity only)")
    p.add_argument("--tagset", default="xpos", choices=["upos", "xpos"], help="for .conllu files")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--model", choices=["hmm", "neural"], default="hmm")
    p.add_argument("--states", type=int, default=45)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--out", type=Path, help="append one JSON line per seed")
    p.add_argument("--heldout", type=Path, help="text (or tagged) file for held-out NLL / perplexity "
                                                "(words unseen in --data map to <unk>)")
    g = p.add_argument_group("hmm (Baum-Welch)")
    g.add_argument("--iterations", type=int, default=200)
    g.add_argument("--smoothing", type=float, default=0.0)
    g.add_argument("--emit-smoothing", type=float, default=None)
    g.add_argument("--init-scale", type=float, default=1.0)
    g.add_argument("--double", action="store_true")
    g = p.add_argument_group("neural hmm (gradient)")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--char-cnn", action="store_true")
    g.add_argument("--no-word-emb", action="store_true")
    g.add_argument("--char-filters", type=int, default=32, help="filters per width of the character CNN")
    g.add_argument("--char-widths", type=int, nargs="+", default=[1, 2, 3, 4])
    g.add_argument("--char-dim", type=int, default=16)
    g.add_argument("--eval-every-log", action="store_true")
    g.add_argument("--gem", action="store_true",
                   help="generalized EM (exact E-step over the corpus, --m-steps Adam steps on the tables) "
                        "for --iterations iterations, instead of minibatch gradient for --epochs")
    g.add_argument("--m-steps", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    words, gold = load(args.data, args.tagset, args.lowercase)
    extra_gold: dict[str, list[list[str]]] = {}
    if args.data.suffix == ".conllu":  # score the other UD tag set of the same words as well
        other = "upos" if args.tagset == "xpos" else "xpos"
        extra_gold[other] = load(args.data, other, args.lowercase)[1]
    vocab = Vocab.build(words)
    data = TextDataset(words, vocab)
    heldout = TextDataset(load(args.heldout, args.tagset, args.lowercase)[0], vocab) if args.heldout else None
    print(f"{args.data.name}: {len(words)} sentences, {sum(map(len, words))} tokens, {len(vocab)} types, "
          f"{len({t for s in gold for t in s}) if gold else 'no'} gold tags", flush=True)
    results = []
    for seed in args.seeds:
        run = run_hmm if args.model == "hmm" else run_neural
        model, r = run(args, data, gold, seed, extra_gold)
        if heldout is not None:
            h = evaluate(model, heldout, None)
            r.update(heldout=str(args.heldout.name), heldout_nll_per_token=h["nll_per_token"],
                     heldout_perplexity=h["perplexity"])
        r.update(seed=seed, model=args.model, data=str(args.data.name), states=args.states,
                 argv=" ".join(sys.argv[1:] if argv is None else argv))
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(r) + "\n")
    keys = ["many_to_one", "one_to_one", "v_measure"]
    for name in extra_gold:
        keys += [f"{name}_{k}" for k in ("many_to_one", "one_to_one", "v_measure")]
    for key in (*keys, "perplexity", "heldout_perplexity"):
        vals = [r[key] for r in results if key in r]
        if not vals:
            continue
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{key}: {statistics.mean(vals):.4f} ± {sd:.4f}  (n={len(vals)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
