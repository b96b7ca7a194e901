"""Training throughput of the sentence VAE (M4): latentlm's engine vs a bare PyTorch loop.

Both train the same architecture (embedding and hidden 256, latent 32, V = 10k, batch 32,
dropout 0.3, no word dropout) on the same PTB batches (epoch-0 order of latentlm's bucketed sampler). The bare loop is
written the way the research code writes it: full (B, T, V) logits with ignore_index
padding, one optimizer step per batch. Runs alternate (engine, bare, engine, ...) so
machine noise hits both; we report medians of target tokens/s and the ratios.

    python benchmarks/bench_vae_throughput.py --steps 40 --repeats 3 --threads 2

The baseline here is a re-implementation written in this repository, NOT the peer's code; the
peer comparison (jxhe/vae-lagging-encoder itself) is benchmarks/bench_vae_peer.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from latentlm.config import load_config
from engine_timing import time_trainer
from latentlm.training.trainer import autocast


class BareVAE(nn.Module):
    """The sentence VAE as a research script writes it, in plain PyTorch."""

    def __init__(self, V, E=256, H=256, D=32):
        super().__init__()
        self.enc_emb = nn.Embedding(V, E, padding_idx=0)
        self.enc = nn.LSTM(E, H, batch_first=True)
        self.to_q = nn.Linear(H, 2 * D)
        self.dec_emb = nn.Embedding(V, E, padding_idx=0)
        self.dec = nn.LSTM(E + D, H, batch_first=True)
        self.z_to_c = nn.Linear(D, H)
        self.out = nn.Linear(H, V)
        self.drop = nn.Dropout(0.3)

    def loss(self, tokens, lengths):
        packed = pack_padded_sequence(self.enc_emb(tokens), (lengths + 1).cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.enc(packed)
        mu, logvar = self.to_q(h[-1]).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        emb = self.drop(self.dec_emb(inputs))
        emb = torch.cat([emb, z[:, None].expand(-1, emb.size(1), -1)], -1)
        c0 = self.z_to_c(z)[None]
        states, _ = self.dec(emb, (torch.tanh(c0), c0))
        logits = self.out(self.drop(states))
        rec = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=0,
                              reduction="sum") / tokens.size(0)
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1).mean()
        return rec + kl


def time_bare(batches, vocab_size, precision):
    torch.manual_seed(0)
    model = BareVAE(vocab_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = sum(b.num_tokens for b in batches)
    start = time.perf_counter()
    for b in batches:
        with autocast(precision):
            loss = model.loss(b.tokens, b.lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    return tokens / (time.perf_counter() - start)


def time_engine(config_path, steps, precision, out):
    cfg = load_config(config_path, [f"train.max_steps={steps}", f"train.precision={precision}", "model.word_dropout=0",
                                    "train.checkpoint_every=1000000", "train.log_every=20",
                                    "data.valid_limit=32", "train.eval_every=1000000"])
    tps, trainer, _ = time_trainer(cfg, out)
    return tps, trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/ptb/vae.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import shutil
    results = {"engine_fp32": [], "bare_fp32": [], "engine_bf16": [], "bare_bf16": []}
    for r in range(args.repeats + 1):  # round 0 warms caches and the allocator; not counted
        for precision, tag in (("fp32", "fp32"), ("bf16-mixed", "bf16")):
            shutil.rmtree(args.out, ignore_errors=True)
            tps, trainer = time_engine(args.config, args.steps, precision, args.out)
            ds = trainer.train_set
            batches = [ds.make_batch(b) for b in ds.batch_indices(32, shuffle=True, seed=0, epoch=0)[: args.steps]]
            bare = time_bare(batches, len(trainer.vocab), precision)
            if r:
                results[f"engine_{tag}"].append(tps)
                results[f"bare_{tag}"].append(bare)
        if r:
            print(json.dumps({k: round(v[-1]) for k, v in results.items()}), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({
        "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "median_tokens_per_s": {k: round(v) for k, v in med.items()},
        "engine_fp32 / bare_fp32": round(med["engine_fp32"] / med["bare_fp32"], 3),
        "engine_bf16 / bare_fp32": round(med["engine_bf16"] / med["bare_fp32"], 3),
        "bare_bf16 / bare_fp32": round(med["bare_bf16"] / med["bare_fp32"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
