"""M7 (lstm_tag_chain): log p(x | z) + gradient for S sampled tag paths, scored from the (B, N, K)
emission table (hard paths) vs S output layers over one-hot (relaxed-form) paths, same model.

    python benchmarks/bench_m7_emissions.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from latentlm.data.batching import collate
from latentlm.models.lstm_tag_chain import LSTMTagChain


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=12000)
    parser.add_argument("--tags", type=int, default=45)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=25)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    V, K, S, B, N = args.vocab, args.tags, args.samples, args.batch, args.length
    model = LSTMTagChain(vocab_size=V, num_states=K, dim=64, hidden_dim=128)
    g = torch.Generator().manual_seed(0)
    batch = collate([torch.cat([torch.tensor([1]), torch.randint(4, V, (N,), generator=g), torch.tensor([2])])
                     for _ in range(B)], list(range(B)))
    z = torch.randint(0, K, (S, B, N), generator=g)
    times = {}
    for name, arg in (("table (hard paths)", z), ("S output layers (one-hot paths)", F.one_hot(z, K).float())):
        runs = []
        for _ in range(args.reps):
            start = time.perf_counter()
            model.log_likelihood(batch, arg).sum().backward()
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
        print(f"{name}: median {times[name]:.3f} s over {args.reps}")
    first, second = times.values()
    print(f"speed-up of the table: {second / first:.2f}x")


if __name__ == "__main__":
    main()
