"""Row alignment of the output layer's products: (rows x 256) x (256 x V) products in row blocks
into a logits buffer whose rows are V elements apart (V = 10,004 fp32: 40,016 bytes, not a
multiple of 64) against the same products into rows padded to a 64-byte multiple (ldc = 10,016),
and against V = 10,000 / 10,016 (aligned by themselves). Medians of 7; GFLOP/s.

    python benchmarks/bench_aligned_rows.py --threads 2
    python benchmarks/bench_aligned_rows.py --threads 2 --vocab 5921 --rows 2304   # Multi30K's English side
"""
from __future__ import annotations

import argparse

import torch
from bench_crf import median_time  # warm-up call, then the median of timed calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=8800, help="rows in all (an IS chunk's tokens)")
    ap.add_argument("--vocab", type=int, default=10004, help="V (the unaligned case; also compared: V rounded "
                                                             "down and up to a multiple of 16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, M = 256, args.rows

    print(f"threads {args.threads}, M = {M}, H = {H}")
    for dtype in (torch.float32, torch.bfloat16):
        for block in (256, 1024):
            cells = []
            v, down, up = args.vocab, args.vocab // 16 * 16, -(-args.vocab // 16) * 16
            for V, ld in ((v, v), (down, down), (v, up), (up, up)):
                x = torch.randn(M, H, dtype=dtype)
                w = (torch.randn(H, ld) * 0.05).to(dtype)[:, :V]
                buf = torch.empty(block, ld, dtype=dtype)

                def run():
                    for s in range(0, M, block):
                        e = min(M, s + block)
                        torch.mm(x[s:e], w, out=buf[: e - s, :V])

                gflops = 2 * M * H * V / median_time(run, 7) / 1e9
                cells.append(f"V {V} rows {ld * x.element_size()} B apart: {gflops:.0f}")
            print(f"{str(dtype).split('.')[-1]}, {block}-row blocks: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
