"""Training throughput of the latent-alignment translators (M11) on Multi30K, in one process.

1. Soft attention through latentlm's engine (``Trainer``: the real training step, metrics and
   all) vs a bare PyTorch loop of the same network on the same batches, written the usual
   way (context = attention-weighted encoding, one Linear over [h_t; context] -> (B, T, V)
   logits, cross-entropy with ignore_index), fp32 and bf16-mixed.
2. Every row's config (soft, exact, hard, variational x 3) through the engine, fp32: target
   tokens/s and the ratio to soft attention — the per-epoch cost comparison of the table,
   measured on the same batches rather than read off runs that shared the CPU.
3. The machine's matmul limit in the same run (fp32 and bf16 GFLOP/s of a 1024^3 product) and
   the fraction of it each row reaches, from the model's forward+backward FLOPs per token.

Runs alternate (every configuration once per repeat) so machine noise hits all of them; the
table reports medians over repeats and ratios.

    python benchmarks/bench_alignment.py --steps 30 --repeats 3 --threads 2 --out benchmarks/results/alignment_bench.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from latentlm.config import load_config
from engine_timing import time_trainer
from latentlm.training.trainer import autocast

REPO = Path(__file__).resolve().parents[1]
ROWS = ["soft", "exact", "hard", "variational_enum", "variational_sf", "variational_gumbel"]


class BareSoftAttention(nn.Module):
    """Soft attention as a research script writes it (same sizes as the configs' networks)."""

    def __init__(self, V_src, V, E=256, H=256, dropout=0.3):
        super().__init__()
        self.src_embed = nn.Embedding(V_src, E, padding_idx=0)
        self.encoder = nn.LSTM(E, H // 2, batch_first=True, bidirectional=True)
        self.tgt_embed = nn.Embedding(V, E, padding_idx=0)
        self.bridge = nn.Linear(H, 2 * H)
        self.decoder = nn.LSTM(E, H, batch_first=True)
        self.key = nn.Linear(H, H, bias=False)
        self.out = nn.Linear(2 * H, V)
        self.drop = nn.Dropout(dropout)

    def loss(self, b):
        packed = pack_padded_sequence(self.drop(self.src_embed(b.source)), b.source_lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        enc = pad_packed_sequence(self.encoder(packed)[0], batch_first=True, total_length=b.source.size(1))[0]
        mask = b.source_mask
        mean = (enc * mask[..., None]).sum(1) / b.source_lengths[:, None]
        h0, c0 = torch.tanh(self.bridge(mean)).chunk(2, -1)
        enc = self.drop(enc)
        h, _ = self.decoder(self.drop(self.tgt_embed(b.inputs)), (h0[None].contiguous(), c0[None].contiguous()))
        h = self.drop(h)
        scores = torch.bmm(h, self.key(enc).transpose(1, 2)).masked_fill(~mask[:, None, :], -1e9)
        context = torch.bmm(scores.softmax(-1), enc)
        logits = self.out(torch.cat([h, context], -1))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), b.targets.reshape(-1), ignore_index=0,
                               reduction="sum") / b.size


def _config(row, steps, precision, data_dir):
    overrides = [f"train.max_steps={steps}", f"train.precision={precision}", "train.checkpoint_every=1000000",
                 "train.log_every=1000000", "data.valid_limit=16", "train.eval_every=1000000"]
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    return load_config(REPO / "configs" / "multi30k" / f"{row}.yaml", overrides)


def time_engine(row, steps, precision, data_dir, out):
    shutil.rmtree(out, ignore_errors=True)
    return time_trainer(_config(row, steps, precision, data_dir), out)


def time_bare(trainer, order, precision):
    ds = trainer.train_set
    torch.manual_seed(0)
    model = BareSoftAttention(len(trainer.vocab.source), len(trainer.vocab))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batches = [ds.make_batch(b) for b in order]
    tokens = sum(b.num_tokens for b in batches)
    start = time.perf_counter()
    for b in batches:
        with autocast(precision):
            loss = model.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    return tokens / (time.perf_counter() - start)


def matmul_gflops(dtype, n=1024, reps=10):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def flops_per_token(trainer, row):
    """Forward + backward (x3) matmul FLOPs per target token of the row's networks, from the
    corpus's mean source and target lengths (the products, not the elementwise work)."""
    ds = trainer.train_set
    T = sum(ds.lengths) / len(ds)
    S = sum(len(s) for s in ds.sources) / len(ds)
    V = len(trainer.vocab)
    m = trainer.config.model
    E, H = m["embed_dim"], m["hidden_dim"]
    enc = S * 2 * 4 * (H // 2) * (E + H // 2)        # BiLSTM
    dec = T * 4 * H * (E + H)                          # decoder LSTM
    attn = S * H * H + T * S * H                       # keys, scores
    out = T * H * V + S * H * V + T * S * V            # a, c, mixing / fused normalizers
    per_sentence = enc + dec + attn + out
    if row.startswith("variational"):
        per_sentence += (S + T) * 2 * 4 * (H // 2) * (E + H // 2) + S * H * H + T * S * H
    return 3 * 2 * per_sentence / T


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--data-dir", help="folder holding multi30k/ (default: ../shared/data; tests/data for a smoke run)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = args.rows.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="bench_alignment_"))
    runs = {f"engine_{r}_fp32": [] for r in rows}
    runs.update({"engine_soft_bf16": [], "bare_soft_fp32": [], "bare_soft_bf16": []})
    limits = {"fp32": [], "bf16": []}
    fpt = {}
    for rep in range(args.repeats + 1):  # round 0 warms caches and the allocator; not counted
        for row in rows:
            tps, trainer, order = time_engine(row, args.steps, "fp32", args.data_dir, scratch / row)
            fpt[row] = flops_per_token(trainer, row)
            if rep:
                runs[f"engine_{row}_fp32"].append(tps)
            if row == "soft":
                for precision, tag in (("fp32", "fp32"), ("bf16-mixed", "bf16")):
                    bare = time_bare(trainer, order, precision)
                    if rep:
                        runs[f"bare_soft_{tag}"].append(bare)
                tps16 = time_engine("soft", args.steps, "bf16-mixed", args.data_dir, scratch / "soft16")[0]
                if rep:
                    runs["engine_soft_bf16"].append(tps16)
        if rep:
            limits["fp32"].append(matmul_gflops(torch.float32))
            limits["bf16"].append(matmul_gflops(torch.bfloat16))
            print(json.dumps({k: round(v[-1]) for k, v in runs.items() if v}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    limit = {k: statistics.median(v) for k, v in limits.items()}
    result = {
        "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "median_tokens_per_s": {k: round(v) for k, v in med.items()},
        "runs_tokens_per_s": {k: [round(x) for x in v] for k, v in runs.items() if v},
        "matmul_limit_gflops": {k: round(v, 1) for k, v in limit.items()},
        "gflop_per_1k_tokens": {r: round(fpt[r] * 1e3 / 1e9, 3) for r in rows},
        "fraction_of_fp32_matmul_limit": {r: round(med[f"engine_{r}_fp32"] * fpt[r] / 1e9 / limit["fp32"], 3)
                                          for r in rows},
    }
    if "soft" in rows:
        result["engine_soft_fp32 / bare_soft_fp32"] = round(med["engine_soft_fp32"] / med["bare_soft_fp32"], 3)
        result["engine_soft_bf16 / bare_soft_fp32"] = round(med["engine_soft_bf16"] / med["bare_soft_fp32"], 3)
        result["engine_soft_bf16 / engine_soft_fp32"] = round(med["engine_soft_bf16"] / med["engine_soft_fp32"], 3)
        result["soft_fp32 / row_fp32 (time per epoch, x soft)"] = {
            r: round(med["engine_soft_fp32"] / med[f"engine_{r}_fp32"], 3) for r in rows}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
