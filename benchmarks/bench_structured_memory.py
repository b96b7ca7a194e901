"""Peak memory of the structured posteriors' training paths against the size of their potentials
(issue 12: "M7 training on PTB at K = 45 and the HSMM at D = 16 stay within a few x their
potentials' size, no (B, T, K, K) tape per step").

Each case runs in a fresh process (``--case``): the inputs are built, the resident-memory
high-water mark is reset (Linux ``clear_refs``), then one forward + backward runs and the peak
growth is reported against the potentials' bytes (``peak_over_potentials``). A saved-tensor
hook also totals what autograd keeps between the forward and the backward (``tape_MB``;
tensors an ``autograd.Function`` keeps on ``ctx`` itself are not seen by it, so the RSS peak is
the number that counts).

Cases (PTB-shaped: B sentences of T words, float32):
  m7_kl      KL(q || p) of M7's chain-CRF posterior to its Markov-chain prior (entropy and cross
             term) + gradient; potentials = unary (B, T, K) + transitions (K, K)
  m7_q       the whole structured part of an M7 ELBO step: the KL, S sampled paths scored under
             q (the score function's log q), the Viterbi path (self-critic baseline)
  m7_step    one full M7 training step (LSTM emissions over V words, BiLSTM q) for context: its
             peak is dominated by the LSTMs and the (B, T, V) output layer, not the chain
  hsmm       semi-Markov log Z + gradient at (B, T, D, K); potentials = seg (B, T, D, K) + (K, K)

    OMP_NUM_THREADS=1 python benchmarks/bench_structured_memory.py --json benchmarks/results/structured_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys

import torch

from bench_hmm import _status_kb as _status  # VmRSS / VmHWM of /proc/self/status, bytes


class Tape:
    """Bytes of the distinct tensors autograd saves for the backward while active."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def build(case: str, B: int, T: int, K: int, D: int, V: int, S: int):
    """(potential bytes, a closure doing forward + backward) for one case."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.full((B,), T, dtype=torch.long)
    lengths[B // 2:] = T * 3 // 4  # ragged, like a length bucket
    if case in ("m7_kl", "m7_q"):
        from torch.distributions import kl_divergence

        from latentlm.models.lstm_tag_chain import MarkovChainPrior
        from latentlm.structured import LinearChainCRF

        unary = torch.randn(B, T, K, generator=g).requires_grad_()
        trans = torch.randn(K, K, generator=g).requires_grad_()
        log_init = torch.randn(K + 1, generator=g).log_softmax(-1).requires_grad_()
        log_trans = torch.randn(K, K + 1, generator=g).log_softmax(-1).requires_grad_()

        def run():
            q = LinearChainCRF(trans, unary, lengths)
            loss = kl_divergence(q, MarkovChainPrior(log_init, log_trans)).sum()
            if case == "m7_q":
                z = q.sample((S,))
                loss = loss + q.log_prob(z).sum() + q.log_prob(q.argmax).sum()
            loss.backward()
        return (unary.numel() + trans.numel()) * 4, run
    if case == "m7_step":
        from latentlm.data.batching import collate
        from latentlm.inference.crf_posterior import CRFBiLSTMPosterior
        from latentlm.inference.elbo import ELBO
        from latentlm.models.lstm_tag_chain import LSTMTagChain

        model = LSTMTagChain(V, K, dim=64, hidden_dim=128)
        q = CRFBiLSTMPosterior(V, K, embed_dim=64, hidden_dim=64, word_scores=True)
        # <s> w_1 .. w_n </s> with ids past the specials (0-3), n = the row's length
        sentences = [torch.cat([torch.tensor([1]), torch.randint(4, V, (int(n),), generator=g), torch.tensor([2])])
                     for n in lengths]
        batch = collate(sentences, range(B))
        objective = ELBO(samples=S, kl="analytic", estimator={"type": "score_function", "baseline": "self_critic"})

        def run():
            objective(model, q, batch).loss.backward()
        return (B * T * K + K * K) * 4, run
    if case == "hsmm":
        from latentlm.structured import semimarkov_log_partition

        seg = torch.randn(B, T, D, K, generator=g).requires_grad_()
        trans = torch.randn(K, K, generator=g).requires_grad_()

        def run():
            semimarkov_log_partition(None, trans, seg, lengths).sum().backward()
        return (seg.numel() + trans.numel()) * 4, run
    raise SystemExit(f"unknown case {case}")


def child(args) -> None:
    torch.set_num_threads(1)
    potentials, run = build(args.case, args.B, args.T, args.K, args.D, args.V, args.S)
    run()  # warm-up: library buffers are not the problem's
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back, or the peak hides in them
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status("VmRSS")
    with Tape() as tape:
        run()
    peak = _status("VmHWM") - rss0
    print(json.dumps({"case": args.case, "B": args.B, "T": args.T, "K": args.K, "D": args.D if args.case == "hsmm" else None,
                      "V": args.V if args.case == "m7_step" else None, "S": args.S,
                      "potentials_MB": potentials / 2**20, "peak_MB": peak / 2**20, "tape_MB": tape.bytes / 2**20,
                      "peak_over_potentials": peak / potentials, "tape_over_potentials": tape.bytes / potentials}))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--case", help="run one case in this process (what the parent calls)")
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--T", type=int, default=40)
    p.add_argument("--K", type=int, default=45)
    p.add_argument("--D", type=int, default=16)
    p.add_argument("--V", type=int, default=10_000)
    p.add_argument("--S", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args()
    if args.case:
        child(args)
        return 0
    rows = []
    for case, extra in [("m7_kl", []), ("m7_q", []), ("m7_step", []), ("hsmm", ["--K", "10"]), ("hsmm", [])]:
        cmd = [sys.executable, __file__, "--case", case, "--B", str(args.B), "--T", str(args.T), "--K", str(args.K),
               "--D", str(args.D), "--V", str(args.V), "--S", str(args.S), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(out, flush=True)
    print("\n| case | B | T | K | D | potentials MB | peak MB | peak / potentials | autograd tape MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['B']} | {r['T']} | {r['K']} | {r['D'] or '–'} | {r['potentials_MB']:.2f} | "
              f"{r['peak_MB']:.1f} | {r['peak_over_potentials']:.1f} | {r['tape_MB']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
