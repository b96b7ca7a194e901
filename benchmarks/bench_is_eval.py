"""Importance-sampled NLL (IS-k) evaluation time: latentlm's batched evaluator vs the
research code's loop (one sentence at a time, samples in chunks), same trained VAE, same
standard-normal draws, one run. Reports wall time, speed-up and the NLL of each.

    python benchmarks/bench_is_eval.py runs/ptb_vae_freebits --sentences 300 --samples 500 --threads 2

The baseline here is a re-implementation written in this repository, NOT the peer's code; the
peer comparison (jxhe/vae-lagging-encoder itself) is benchmarks/bench_vae_peer.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from latentlm.evaluation import importance_sampled_log_marginal
from latentlm.system import load_pretrained
from latentlm.training import autocast, load_corpus


@torch.no_grad()
def loop_is(model, posterior, dataset, order, noise, chunk):
    """He et al. (2019)'s calc_iwnll shape: batch of one sentence, k samples in chunks."""
    total = 0.0
    for row, i in enumerate(order):
        batch = dataset.make_batch([i])
        q, p = posterior(batch), model.prior()
        log_w = []
        for start in range(0, noise.size(1), chunk):
            eps = noise[row, start : start + chunk][:, None]          # (c, 1, D)
            z = q.base_dist.loc + q.base_dist.scale * eps
            c = z.size(0)
            states = model.decoder.hidden_states(batch.inputs.repeat(c, 1), z.reshape(c, -1))
            logits = model.decoder.out(states)                        # (c, T, V), a fresh tensor each chunk
            ll = F.log_softmax(logits.float(), -1).gather(-1, batch.targets.repeat(c, 1)[..., None]).squeeze(-1).sum(-1)
            log_w.append(ll + p.log_prob(z[:, 0]) - q.log_prob(z)[:, 0])
        total -= float(torch.logsumexp(torch.cat(log_w), 0) - math.log(noise.size(1)))
    return total


@torch.no_grad()
def batched_is(model, posterior, dataset, order, noise, batch_size, precision):
    pos = {i: r for r, i in enumerate(order)}
    batches = [sorted(order, key=dataset.lengths.__getitem__)[s : s + batch_size] for s in range(0, len(order), batch_size)]
    total = 0.0
    for idx in batches:
        batch = dataset.make_batch(idx)
        eps = noise[[pos[i] for i in idx]].transpose(0, 1)           # (k, B, D)
        with autocast(precision):
            total -= float(importance_sampled_log_marginal(model, posterior, batch, noise.size(1), noise=eps).sum())
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--loop-chunk", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    system, config, vocab = load_pretrained(args.run)
    _, data = load_corpus(config, vocab, splits=("test",))
    ds = data["test"]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=g)[: args.sentences].tolist()
    noise = torch.randn(len(order), args.samples, system.model.latent_dim, generator=g)
    tokens = sum(ds.lengths[i] for i in order)
    results = {}
    for name, fn in (
        ("loop_fp32", lambda: loop_is(system.model, system.posterior, ds, order, noise, args.loop_chunk)),
        ("batched_fp32", lambda: batched_is(system.model, system.posterior, ds, order, noise, args.batch_size, "fp32")),
        ("batched_bf16", lambda: batched_is(system.model, system.posterior, ds, order, noise, args.batch_size, "bf16-mixed")),
    ):
        start = time.perf_counter()
        nll = fn()
        results[name] = {"seconds": time.perf_counter() - start, "nll_per_sentence": nll / len(order),
                         "ppl": math.exp(nll / tokens)}
        print(name, json.dumps(results[name]), flush=True)
    base = results["loop_fp32"]
    summary = {
        "sentences": len(order), "samples": args.samples, "tokens": tokens, "threads": args.threads,
        "speedup_batched_fp32": base["seconds"] / results["batched_fp32"]["seconds"],
        "speedup_batched_bf16": base["seconds"] / results["batched_bf16"]["seconds"],
        "nll_diff_fp32": results["batched_fp32"]["nll_per_sentence"] - base["nll_per_sentence"],
        "nll_diff_bf16": results["batched_bf16"]["nll_per_sentence"] - base["nll_per_sentence"],
        "results": results,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
