"""``make demo``: train an LSTM LM and a sentence VAE on PTB in about ten minutes on 2 cores,
evaluate both on the test set, and show samples and an interpolation.

The budget is documented here and in the README: each model trains on the full PTB
training split for a fixed wall-clock budget (LM 3 min, VAE 4 min, one validation at the
end), then both are evaluated on the first 1,000 test sentences, the VAE with 100
importance samples per sentence (the full-length protocol, 500 samples on all 3,761
sentences, is ``latentlm evaluate DIR``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from latentlm.config import load_config
from latentlm.errors import LatentLMError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "ptb"


def run(out: Path, lm_minutes: float, vae_minutes: float, test_limit: int, samples: int) -> None:
    from latentlm.device import device_generator, module_device
    from latentlm.evaluation import evaluate, interpolate, sample_sentences
    from latentlm.system import load_pretrained
    from latentlm.training import load_corpus, train

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if out.exists():
        shutil.rmtree(out)
    jobs = [
        ("LSTM LM", "lm", CONFIGS / "lm.yaml", lm_minutes, []),
        ("sentence VAE", "vae", CONFIGS / "vae.yaml", vae_minutes,
         ["objective.kl_schedule.steps=2000", "objective.free_bits=0.1"]),
    ]
    from latentlm.data.corpus import find_corpus

    first = load_config(CONFIGS / "lm.yaml")
    print(f"== corpus {first.data.name!r}: {find_corpus(first.data.name, first.data.data_dir)} ==", flush=True)
    rows = []
    for title, name, config_path, minutes, extra in jobs:
        config = load_config(config_path, [f"train.max_minutes={minutes}", "train.eval_every=1000000", *extra])
        print(f"== training the {title} for {minutes} min ({config_path.relative_to(REPO)}) ==", flush=True)
        train(config, out / name)
        system, config, vocab = load_pretrained(out / name, device=None)  # where it trained (train.device)
        config.data.test_limit = test_limit
        _, data = load_corpus(config, vocab, splits=("test",))
        print(f"== evaluating the {title} on {test_limit} test sentences ==", flush=True)
        result = evaluate(system, data["test"], samples=samples, progress=True)
        rows.append((title, result))
        if name == "vae":
            gen = device_generator(0, module_device(system))
            vae_text = {
                "samples": sample_sentences(system.model, vocab, 3, generator=gen),
                "interpolation": interpolate(system.model, system.posterior, vocab,
                                             "the company said it expects to report a loss".split(),
                                             "mr. smith is chairman of the board".split(), steps=5),
            }
    print()
    print(f"PTB test, first {test_limit} sentences (NLL in nats per sentence; VAE NLL by importance sampling, "
          f"{samples} samples)")
    print("| model | NLL | PPL | ELBO | KL | MI | AU |\n|---|---|---|---|---|---|---|")
    for title, r in rows:
        # a model without a latent variable has no KL, MI or AU: "—", not 0
        kl, mi, au = ((f"{r['kl']:.2f}", f"{r['mi']:.2f}", str(r["au"])) if r.get("mi") is not None
                      else ("—", "—", "—"))
        print(f"| {title} | {r['nll']:.2f} | {r['ppl']:.1f} | {r['elbo']:.2f} | {kl} | {mi} | {au} |")
    print("\nThree sentences sampled from the VAE's prior:")
    for line in vae_text["samples"]:
        print("  *", line)
    print("\nInterpolation between two sentences' posterior means:")
    for line in vae_text["interpolation"]:
        print("  ->", line)
    print(f"\nRuns are in {out}; try `latentlm evaluate {out / 'vae'}` or `latentlm sample {out / 'vae'} -n 5`.")
    from latentlm.report.document import build_report

    print("== writing the report of both runs ==", flush=True)
    page = build_report([out / "lm", out / "vae"], out)
    print(f"\nReport: {page} (open it in a browser; Markdown beside it: {page.with_suffix('.md')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--lm-minutes", type=float, default=3.0)
    parser.add_argument("--vae-minutes", type=float, default=4.0)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        run(args.out, args.lm_minutes, args.vae_minutes, args.test_limit, args.samples)
    except LatentLMError as err:
        print(f"latentlm demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
