"""Held-out perplexity and topics of M10 (neural topic model, GSM) and M3 (bag-of-words VAE) on documents.

For each model, in one run:

1. the vocabulary is built on the train split (``load_documents``: lower-cased tokens,
   scikit-learn English stop words removed, the ``--vocab-size`` most frequent words with
   document frequency >= ``--min-df``); the test split is read with that vocabulary;
2. the model is trained by amortized VI — the repo's ``ELBO`` (reparameterization, one
   sample), the ``gaussian_bow`` posterior, Adam — for ``--epochs`` epochs of minibatches
   on the train split less a ``--val-fraction`` held out; the epoch with the best
   validation bound perplexity is kept. Three defaults of this script depart from the
   library's defaults, each with a flag to turn it off (see ``GaussianBOWPosterior`` and
   ``NeuralTopicModel.init_topics_from_documents`` for why): the encoder's mean and
   log-variance are soft-bounded and its hidden features see dropout 0.3 while training
   (``gaussian_bow``'s ``bound`` and ``dropout`` options; ``--posterior-bound 0 0
   --encoder-dropout 0`` gives the plain encoder); M10's topics start from random training
   documents (``--topic-init-docs 0``: the default near-uniform init); gradients are
   clipped (``--clip 0``: off);
3. on the test split it reports the per-word perplexity exp(-sum_d log p(x_d) / sum_d N_d)
   with log p(x_d) by importance sampling (``--samples`` draws from q(z | x_d)), the
   ELBO-based bound perplexity (what Miao et al. 2016/2017 report), the KL, and for M10
   the top words of every topic and their NPMI coherence from document co-occurrence on
   the training split.

Likelihood convention: log p(x_d) = sum_w n_dw log p(w | ...), the multinomial *without*
its coefficient N_d! / prod_w n_dw! (the literature's convention). Documents left with no
in-vocabulary word (after stop words and the vocabulary cut) are *skipped* in every split:
their log p(x_d) is exactly 0 and N_d = 0, so they would not change the token-weighted
perplexity anyway, and they carry no training signal besides the KL; their numbers are
reported. The 4 special ids of the vocabulary (<pad> <s> </s> <unk>) are never observed
in documents; the models keep them in their softmax and learn to give them ~0 mass.

M10's likelihood of a document batch is evaluated only at each document's observed words
(``NeuralTopicModel.observed_log_likelihood``), never as a (samples, docs, topics, V) tensor.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/topic_model.py --epochs 30 --json topic_model.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latentlm.data.documents import BagOfWords, load_documents
from latentlm.inference import ELBO, POSTERIORS, kl_per_dimension
from latentlm.models import BagOfWordsVAE, NeuralTopicModel
from latentlm.models.topic_model import npmi_coherence

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "docs"
MODEL_NAMES = {"m10": "M10 neural topic model (GSM)", "m3": "M3 bag-of-words VAE (NVDM-style)"}

#: (samples x docs x V) floats M3's dense likelihood builds at once while scoring.
M3_CHUNK_ELEMENTS = 20_000_000


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def sample_chunk(model, batch) -> int:
    """How many posterior samples to score at once for this batch."""
    if isinstance(model, BagOfWordsVAE):
        return max(1, M3_CHUNK_ELEMENTS // max(1, batch.size * model.vocab_size))
    return 10**9  # M10's observed-words likelihood chunks itself


@torch.no_grad()
def score_batch(model, posterior, batch, noise: torch.Tensor, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Importance-sampled log p(x), ELBO, reconstruction and KL per document, (B,) each.

    ``noise`` (S, B, D) are the standard-normal draws: z_s = mean + std * noise_s, the same
    samples for the IS estimate log (1/S) sum_s p(x, z_s) / q(z_s | x) and for the ELBO's
    reconstruction (1/S) sum_s log p(x | z_s); the ELBO's KL is in closed form.
    """
    q, p = posterior(batch), model.prior()
    chunk = chunk or sample_chunk(model, batch)
    log_w, rec = [], []
    for start in range(0, noise.size(0), chunk):
        z = q.base_dist.loc + q.base_dist.scale * noise[start : start + chunk]  # (c, B, D)
        ll = model.log_likelihood(batch, z)  # (c, B)
        rec.append(ll)
        log_w.append(ll + p.log_prob(z) - q.log_prob(z))
    samples = noise.size(0)
    log_px = torch.logsumexp(torch.cat(log_w), 0) - math.log(samples)
    reconstruction = torch.cat(rec).mean(0)
    kl = kl_per_dimension(q, p).sum(-1)
    return {"log_px": log_px, "elbo": reconstruction - kl, "reconstruction": reconstruction, "kl": kl}


def perplexity(log_prob_sum: float, tokens: int) -> float:
    try:
        return math.exp(-log_prob_sum / max(1, tokens))
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(model, posterior, bow: BagOfWords, samples: int, batch_size: int, seed: int,
             progress: bool = False, desc: str = "") -> dict:
    """Per-word perplexities of ``bow`` (token-weighted and, as in Miao et al., per-document averaged)."""
    model.eval()
    posterior.eval()
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"log_px": [], "elbo": [], "reconstruction": [], "kl": []}
    lengths = []
    batches = bow.batches(batch_size)
    if progress:
        batches = tqdm(batches, total=bow.num_batches(batch_size), desc=desc, leave=False)
    for batch in batches:
        noise = torch.randn(samples, batch.size, model.latent_dim, generator=gen)
        for key, value in score_batch(model, posterior, batch, noise).items():
            parts[key].append(value)
        lengths.append(batch.lengths)
    res = {k: torch.cat(v).double() for k, v in parts.items()}
    n = torch.cat(lengths).double()
    tokens = int(n.sum())
    return {
        "docs": int(n.numel()), "tokens": tokens, "samples": samples,
        "ppl_is": perplexity(float(res["log_px"].sum()), tokens),
        "ppl_bound": perplexity(float(res["elbo"].sum()), tokens),
        # Miao et al.'s definition: exp(-(1/D) sum_d log p(x_d) / N_d)
        "ppl_is_doc_avg": math.exp(-float((res["log_px"] / n).mean())),
        "ppl_bound_doc_avg": math.exp(-float((res["elbo"] / n).mean())),
        "log_px_per_doc": float(res["log_px"].mean()),
        "elbo_per_doc": float(res["elbo"].mean()),
        "kl_per_doc": float(res["kl"].mean()),
        "is_minus_elbo_per_doc": float((res["log_px"] - res["elbo"]).mean()),
    }


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def build(name: str, vocab_size: int, args) -> tuple[torch.nn.Module, torch.nn.Module]:
    if name == "m10":
        model = NeuralTopicModel(vocab_size, num_topics=args.topics, latent_dim=args.latent_dim)
    else:
        model = BagOfWordsVAE(vocab_size, latent_dim=args.latent_dim)
    bound = tuple(args.posterior_bound) if all(b > 0 for b in args.posterior_bound) else None
    posterior = POSTERIORS["gaussian_bow"](vocab_size, args.latent_dim, hidden_dim=args.hidden_dim,
                                           dropout=args.encoder_dropout, bound=bound)
    return model, posterior


def train(name: str, model, posterior, train_bow: BagOfWords, val_bow: BagOfWords, args) -> dict:
    """Amortized VI; keeps the parameters of the epoch with the best validation bound perplexity."""
    warmup_steps = round(args.kl_warmup * train_bow.num_batches(args.batch_size))
    schedule = {"type": "linear", "start": 0.0, "end": 1.0, "steps": warmup_steps} if warmup_steps > 0 else None
    objective = ELBO(samples=1, estimator="reparam", kl_schedule=schedule)  # .bound is always the true ELBO
    params = [*model.parameters(), *posterior.parameters()]
    opt = torch.optim.AdamW([{"params": model.parameters(), "weight_decay": 0.0},
                             {"params": posterior.parameters(), "weight_decay": args.encoder_weight_decay}], lr=args.lr)
    history, best, step = [], None, 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        posterior.train()
        t0 = time.perf_counter()
        bound_sum, kl_sum, tokens = 0.0, 0.0, 0
        batches = train_bow.batches(args.batch_size, shuffle=True, seed=args.seed, epoch=epoch)
        for batch in tqdm(batches, total=train_bow.num_batches(args.batch_size), desc=f"{name} epoch {epoch}",
                          leave=False, disable=not args.progress):
            out = objective(model, posterior, batch, step)
            opt.zero_grad()
            out.loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            step += 1
            bound_sum += float(out.bound.detach().sum())
            kl_sum += float(out.kl.detach().sum())
            tokens += batch.num_tokens
        val = evaluate(model, posterior, val_bow, args.val_samples, args.eval_batch_size, seed=args.seed + 1)
        record = {"epoch": epoch, "train_ppl_bound": perplexity(bound_sum, tokens), "train_kl": kl_sum / len(train_bow),
                  "val_ppl_bound": val["ppl_bound"],
                  "val_kl": val["kl_per_doc"], "seconds": time.perf_counter() - t0}
        history.append(record)
        improved = best is None or val["ppl_bound"] < best["val_ppl_bound"]
        if improved:
            best = {"epoch": epoch, "val_ppl_bound": val["ppl_bound"],
                    "model": copy.deepcopy(model.state_dict()), "posterior": copy.deepcopy(posterior.state_dict())}
        print(f"{name} epoch {epoch:3d}: train bound PPL {record['train_ppl_bound']:8.1f} KL {record['train_kl']:6.2f}  "
              f"val bound PPL "
              f"{val['ppl_bound']:8.1f}  val KL {val['kl_per_doc']:6.2f}  {record['seconds']:.1f}s"
              f"{'  *' if improved else ''}", flush=True)
    model.load_state_dict(best["model"])
    posterior.load_state_dict(best["posterior"])
    return {"history": history, "best_epoch": best["epoch"], "best_val_ppl_bound": best["val_ppl_bound"]}


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(DATA / "20news-bydate.train.jsonl"))
    p.add_argument("--test", default=str(DATA / "20news-bydate.test.jsonl"))
    p.add_argument("--models", nargs="+", default=["m10", "m3"], choices=["m10", "m3"])
    p.add_argument("--topics", type=int, default=50, help="M10's number of topics K")
    p.add_argument("--latent-dim", type=int, default=50, help="dimension of z (both models)")
    p.add_argument("--hidden-dim", type=int, default=256, help="gaussian_bow encoder MLP width")
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--min-df", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--encoder-dropout", type=float, default=0.3,
                   help="dropout on the gaussian_bow encoder's hidden features while training (0: the plain posterior)")
    p.add_argument("--posterior-bound", type=float, nargs=2, default=[10.0, 5.0], metavar=("MEAN", "LOGVAR"),
                   help="soft bounds m tanh(./m) on the posterior mean and log-variance; 0 0: none")
    p.add_argument("--kl-warmup", type=float, default=0.0,
                   help="epochs over which the KL weight of the training loss rises linearly from 0 to 1")
    p.add_argument("--topic-init-docs", type=int, default=20,
                   help="M10: start each topic from this many random training documents (half) and the unigram "
                        "(half); 0: the model's default random init")
    p.add_argument("--topic-init-per-document", action="store_true",
                   help="M10 init from averaged per-document word distributions instead of pooled counts")
    p.add_argument("--clip", type=float, default=10.0, help="gradient-norm clipping (0: none)")
    p.add_argument("--encoder-weight-decay", type=float, default=0.0, help="decoupled weight decay on the encoder")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--val-samples", type=int, default=4, help="posterior samples of the per-epoch validation ELBO")
    p.add_argument("--samples", type=int, default=50, help="importance samples per test document")
    p.add_argument("--top-words", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    train_all = load_documents(args.train, max_size=args.vocab_size, min_df=args.min_df)
    test_all = load_documents(args.test, vocab=train_all.vocab)
    vocab = train_all.vocab
    train_full = train_all.subset(np.flatnonzero(train_all.lengths > 0))
    test = test_all.subset(np.flatnonzero(test_all.lengths > 0))
    order = np.random.default_rng(args.seed).permutation(len(train_full))
    n_val = max(1, round(args.val_fraction * len(train_full)))
    val, train_bow = train_full.subset(np.sort(order[:n_val])), train_full.subset(np.sort(order[n_val:]))
    data = {
        "vocab_size": len(vocab), "words": len(vocab) - 4,
        "train_docs": len(train_all), "train_empty_skipped": len(train_all) - len(train_full),
        "test_docs": len(test_all), "test_empty_skipped": len(test_all) - len(test),
        "fit_docs": len(train_bow), "val_docs": len(val),
        "fit_tokens": train_bow.num_tokens, "val_tokens": val.num_tokens, "test_tokens": test.num_tokens,
    }
    print(f"vocabulary {data['words']} words (+4 specials) from {Path(args.train).name}; train {len(train_all)} docs "
          f"({data['train_empty_skipped']} empty skipped) -> fit {len(train_bow)} / val {len(val)}; test "
          f"{len(test_all)} docs ({data['test_empty_skipped']} empty skipped), {test.num_tokens} tokens; "
          f"load {time.perf_counter() - start:.1f}s", flush=True)

    results: dict[str, dict] = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        model, posterior = build(name, len(vocab), args)
        if name == "m10" and args.topic_init_docs > 0:
            model.init_topics_from_documents(train_bow.counts, args.topic_init_docs, args.seed,
                                             per_document=args.topic_init_per_document)
        record = train(name, model, posterior, train_bow, val, args)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        record["test"] = evaluate(model, posterior, test, args.samples, args.eval_batch_size, seed=args.seed + 2,
                                  progress=args.progress, desc=f"{name} test IS")
        record["eval_seconds"] = time.perf_counter() - t1
        record["train_seconds"] = train_seconds
        if name == "m10":
            top = model.top_words(args.top_words)  # (K, n)
            npmi = npmi_coherence(top, train_full.counts)  # scipy counts: only the used columns go dense
            record["topics"] = [{"words": [vocab.itos[i] for i in row.tolist()], "npmi": float(s)}
                                for row, s in zip(top, npmi)]
            record["npmi_mean"] = float(npmi.mean())
        record["seconds"] = time.perf_counter() - t0
        results[name] = record
        t = record["test"]
        print(f"{name}: best epoch {record['best_epoch']}; test PPL (IS, {args.samples}) {t['ppl_is']:.1f}, "
              f"bound {t['ppl_bound']:.1f}, KL {t['kl_per_doc']:.2f}; {record['seconds']:.1f}s", flush=True)

    lines = [f"| model | test PPL (IS, k={args.samples}) | PPL bound (ELBO) | KL (nats/doc) | mean NPMI (top "
             f"{args.top_words}) | bound PPL, doc-avg | best epoch | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        t = r["test"]
        label = MODEL_NAMES[name] + (f", K={args.topics}" if name == "m10" else "")
        lines.append(f"| {label} | {t['ppl_is']:.1f} | {t['ppl_bound']:.1f} | {t['kl_per_doc']:.2f} | "
                     f"{fmt(r.get('npmi_mean'), 3)} | {t['ppl_bound_doc_avg']:.1f} | {r['best_epoch']}/{args.epochs} | "
                     f"{r['seconds']:.0f} |")
    table = "\n".join(lines)
    print()
    print(table)
    if "m10" in results:
        print(f"\nM10 topics (top {args.top_words} words, NPMI on the training split):")
        for k, topic in enumerate(results["m10"]["topics"]):
            print(f"  {k:2d} [{topic['npmi']:+.3f}] {' '.join(topic['words'])}")
    out = {"args": vars(args), "command": " ".join(sys.argv if argv is None else ["scripts/topic_model.py", *argv]), "data": data, "results": results, "table": table,
           "seconds": time.perf_counter() - start}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
