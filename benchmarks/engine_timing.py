"""Timing latentlm's own training loop (the ``Trainer``, every per-step cost included) on the
first ``train.max_steps`` batches of epoch 0, for the throughput benchmarks."""

from __future__ import annotations

import time

from latentlm.training.trainer import Trainer


def time_trainer(config, out):
    """(target tokens/s of ``config``'s first ``train.max_steps`` batches, the trainer, their index lists).
    Corpus reading and vocabulary building happen before the clock starts."""
    trainer = Trainer(config, out, progress=False)
    trainer._setup()
    t = config.train
    order = trainer.train_set.batch_indices(t.batch_size, shuffle=True, seed=config.seed, epoch=0)[:t.max_steps]
    tokens = sum(trainer.train_set.lengths[i] for b in order for i in b)
    start = time.perf_counter()
    trainer._fit()
    elapsed = time.perf_counter() - start
    trainer._metrics_fh.close()
    return tokens / elapsed, trainer, order
