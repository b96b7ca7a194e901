"""The one training loop, shared by every model and objective.

Plain PyTorch with ``torch.distributed`` for data parallelism: launched by ``torchrun``
(``WORLD_SIZE`` > 1) the system is wrapped in DistributedDataParallel (nccl when the
tensors are on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU); ``train.batch_size`` is
the global batch and each rank takes its slice of every batch. Rank 0 alone writes checkpoints, metrics and the progress bar.
``train.device`` (auto | cpu | cuda | cuda:N) says where the system and its batches live.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from latentlm.config import Config
from latentlm.data.batching import TextDataset
from latentlm.data.loading import load_corpus as load_data
from latentlm.data.vocab import Vocab
from latentlm.device import describe, module_device, resolve_device
from latentlm.evaluation.latent import LatentStatistics
from latentlm.evaluation.likelihood import perplexity
from latentlm.errors import CheckpointError, ConfigError
from latentlm.nn.output import frozen_parameters
from latentlm.precision import autocast
from latentlm.system import System, build_system, source_size
from latentlm.models.base import InitializedFromData
from latentlm.training.aggressive import AggressiveEncoderTraining
from latentlm.io import atomic_write_text, save_weights
from latentlm.training.collapse import CollapseWatch
from latentlm.training.checkpoint import gather_rng_states, latest_checkpoint, load_checkpoint, save_checkpoint
from latentlm.training.learners import make_learner

log = logging.getLogger("latentlm")

METRIC_FIELDS = ["split", "step", "epoch", "loss", "nll", "kl", "reconstruction", "kl_weight", "mi", "au", "lr",
                 "tokens_per_s", "elapsed_s", "beta"]


def load_corpus(config: Config, vocab: Vocab | None = None, splits=("train", "valid", "test")):
    """Read the corpus named in ``config.data`` (any ``data.format``); build the vocabulary from
    train if not given. See :func:`latentlm.data.loading.load_corpus`."""
    return load_data(config.data, vocab, splits, seed=config.seed)


def make_optimizer(config: Config, params) -> torch.optim.Optimizer:
    # fused=True: one multi-tensor kernel per step instead of ~6 elementwise passes per
    # parameter (about a tenth of a sentence-VAE step on CPU with the unfused Adam).
    t = config.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=True)
    raise ConfigError(f"train.optimizer must be 'adam' or 'sgd', got {t.optimizer!r}")


@torch.no_grad()
@frozen_parameters()  # no parameter changes inside: bf16 weight copies are kept
def validate(system: System, dataset: TextDataset, batch_size: int, precision: str = "fp32",
             seed: int = 0) -> dict[str, float]:
    """Mean per-example bound (ELBO, or exact log-likelihood) over a split; with a posterior
    also KL, the mutual information I_q(x; z) and the active units over the split, by
    :class:`~latentlm.evaluation.latent.LatentStatistics` (the one definition evaluation uses),
    of the q each batch's bound was computed with (so KL and MI can be plotted over training).

    Under ``torch.distributed`` each rank scores every ``world``-th batch; the sums are
    all-reduced and the posteriors gathered in batch order, so every rank returns the numbers
    one process would (to floating-point rounding), not its own shard's."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    was_training = system.training
    system.eval()
    device = module_device(system)
    sums = torch.zeros(4, dtype=torch.float64)  # -bound, -reconstruction, examples, tokens
    stats = LatentStatistics(system.model.prior()) if system.posterior is not None and \
        LatentStatistics.describes(system.model) else None
    shards = []  # (batch number, that batch's LatentStatistics) of this rank
    for number, idx in enumerate(dataset.batch_indices(batch_size)):
        if number % world != rank:
            continue
        batch = dataset.make_batch(idx).to(device)
        with autocast(precision, device):
            out = system(batch)
            if stats is not None:
                part = LatentStatistics(system.model.prior())
                part.add(out.q if out.q is not None else
                         system.objective.evaluation_posterior(system.model, system.posterior, batch))
                shards.append((number, part))
        sums[0] -= float(out.bound.double().sum())
        if out.reconstruction is not None:
            sums[1] -= float(out.reconstruction.double().sum())
        sums[2] += batch.size
        sums[3] += batch.num_tokens
    system.train(was_training)
    if world > 1:
        dist.all_reduce(sums)  # gloo/nccl: on the CPU tensor with gloo, else on the device
        if stats is not None:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, [(n, part.state()) for n, part in shards])
            shards = [(n, LatentStatistics.from_state(system.model.prior(), state))
                      for rank_shards in gathered for n, state in rank_shards]
    if stats is not None:
        for _, part in sorted(shards, key=lambda item: item[0]):  # the one-process order
            stats.merge(part)
    nll, reconstruction, n, tokens = sums.tolist()
    out = {"nll": nll / max(1, n), "reconstruction": reconstruction / max(1, n)}
    out["kl"] = 0.0
    out["ppl_bound"] = perplexity(nll, int(tokens))
    if stats is not None:
        latent = stats.result(seed)
        out["kl"] = latent["kl"]
        for key in ("mi", "au"):
            if latent[key] is not None:
                out[key] = latent[key]
    return out


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_valid: float = math.inf
    bad_epochs: int = 0
    stopped: str | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    validated_at: int | None = None    # step of the last validation, and its MI (the aggressive
    valid_mi: float | None = None      # phase reuses it): in the state so a resume decides alike
    metrics_rows: int | None = None    # rows in metrics.csv when the checkpoint was taken


class Trainer:
    """Fits ``config`` into ``out_dir``; ``resume=True`` continues from the latest checkpoint."""

    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False, progress: bool | None = None):
        self.config, self.out = config, Path(out_dir)
        self.resume, self.progress = resume, progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self._metrics_rows = 0
        self.collapse = CollapseWatch()  # warns once when validation shows the posterior collapsing
        self._replay_collapse = False  # resumed from a checkpoint without the watch's state

    # -- set-up -------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        # torchrun sets LOCAL_RANK: with a CUDA device each rank takes its own GPU
        local_rank = int(os.environ["LOCAL_RANK"]) if self.world > 1 and "LOCAL_RANK" in os.environ else None
        self.device = resolve_device(cfg.train.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed)
        ckpt_root = self.out / "checkpoints"
        self.ckpt = latest_checkpoint(ckpt_root) if self.resume else None
        if self.resume and self.ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_root}")
        if not self.resume and (self.out / "checkpoints" / "latest.json").exists():
            raise CheckpointError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        vocab = Vocab.load(self.out / "vocab.json") if self.resume else None
        self.vocab, data = load_corpus(cfg, vocab, splits=("train", "valid"))
        self.train_set, self.valid_set = data["train"], data["valid"]
        # on the device before the optimizer sees the parameters
        self.system = build_system(cfg, len(self.vocab), words=self.vocab.itos,
                                   source_vocab_size=source_size(self.vocab)).to(self.device)
        self.optimizer = make_optimizer(cfg, self.system.parameters())
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=cfg.train.lr_decay, patience=cfg.train.lr_patience)
        self.state = TrainState()
        self.aggressive = AggressiveEncoderTraining.from_config(cfg.train.aggressive, self.system, lr=cfg.train.lr,
                                                                clip=cfg.train.clip)
        if self.ckpt is not None:
            saved = load_checkpoint(self.ckpt, self.system, self._optimizers(), rank=self.rank)
            self.state = TrainState(**saved["train_state"])
            if self.aggressive is not None and "aggressive" in saved:
                self.aggressive.load_state_dict(saved["aggressive"])
            if "collapse" in saved:
                self.collapse.load_state_dict(saved["collapse"])
            else:  # a checkpoint from before the collapse state: replayed from metrics.csv's kept rows
                self._replay_collapse = True
            if self.state.stopped == "budget":  # a new budget may let it go on
                self.state.stopped = None
            self.scheduler.load_state_dict(self.state.scheduler)
        self.ddp = None
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.system, device_ids=ids, output_device=ids[0] if ids else None)
        self.learner = make_learner(cfg, self.system, self.optimizer, self.ddp, self.aggressive, ckpt_root)
        if self.ckpt is not None:
            self.learner.load_state_dict(saved.get("learner", {}))
            if not self.learner.updates_every_step and self.state.batch_in_epoch:
                # EM: the checkpoint's parameters are those of the epoch's start; redo its E-step
                self.state.step -= self.state.batch_in_epoch
                self.state.batch_in_epoch = 0
        else:
            if isinstance(self.system.model, InitializedFromData):
                self.system.model.initialize_from_data(self.train_set, cfg.seed)
            self.learner.start(self.train_set, cfg.train.batch_size)
        if self.is_main:
            if self.progress is not False:
                tqdm.write(f"device: {describe(self.device)}" + (f" x {self.world} ranks" if self.world > 1 else ""),
                           file=sys.stderr)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", cfg.to_json())
            self.vocab.save(self.out / "vocab.json")
            self._open_metrics()

    def _open_metrics(self) -> None:
        path = self.out / "metrics.csv"
        rows = []
        if self.resume and path.is_file():  # drop rows past the checkpoint we resume from
            with path.open() as fh:
                rows = list(csv.DictReader(fh))
            if self.state.metrics_rows is not None:
                rows = rows[: self.state.metrics_rows]
            else:  # a checkpoint from before the row count
                rows = [r for r in rows if int(r["step"]) <= self.state.step]
        self._metrics_rows = len(rows)
        if self._replay_collapse and self.system.posterior is not None:
            for row in rows:
                if row["split"] == "valid":
                    self.collapse.update(int(row["step"]), row)
        # Rewrite the kept history atomically (a kill right after a resume must not lose it),
        # then append.
        kept = io.StringIO(newline="")
        writer = csv.DictWriter(kept, METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, kept.getvalue())
        self._metrics_fh = path.open("a", newline="")
        self._metrics = csv.DictWriter(self._metrics_fh, METRIC_FIELDS, extrasaction="ignore")
        self._tb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter  # only if tensorboard is installed

            self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def _log(self, row: dict[str, Any]) -> None:
        self._metrics_rows += 1
        if not self.is_main:
            return
        self._metrics.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self._metrics_fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{row['split']}/{k}", v, row["step"])

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        named = {"optimizer": self.optimizer}
        if self.aggressive is not None:
            named["aggressive.encoder_optimizer"] = self.aggressive.encoder_optimizer
        return named

    def _checkpoint(self) -> None:
        rng = gather_rng_states()  # a collective: every rank takes part
        if not self.is_main:
            return
        self.state.scheduler = self.scheduler.state_dict()
        self.state.metrics_rows = self._metrics_rows
        extra = {"train_state": self.state.__dict__}
        if self.aggressive is not None:
            extra["aggressive"] = self.aggressive.state_dict()
        extra["learner"] = self.learner.state_dict()
        extra["collapse"] = self.collapse.state_dict()
        save_checkpoint(self.out / "checkpoints", self.state.step, self.system, self._optimizers(), extra,
                        keep=self.config.train.keep_checkpoints, rng=rng)

    # -- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._setup()
        try:
            return self._fit()
        finally:
            if self.is_main:
                self._metrics_fh.close()
                if self._tb is not None:
                    self._tb.close()

    def _fit(self) -> dict[str, Any]:
        cfg, t, st = self.config, self.config.train, self.state
        every_step = self.learner.updates_every_step  # else (EM): checkpoints and validation at epoch ends
        self.system.train()
        start_time = time.monotonic()
        deadline = start_time + 60 * t.max_minutes if t.max_minutes else math.inf
        kill_at = int(os.environ.get("LATENTLM_KILL_AT_STEP", "0"))  # fault injection for tests
        if t.max_steps and st.step >= t.max_steps:  # resumed from a checkpoint taken at the budget
            st.stopped = "budget"
        while st.stopped is None and st.epoch < t.epochs:
            batches = self.train_set.batch_indices(t.batch_size, shuffle=True, seed=cfg.seed, epoch=st.epoch)
            if self.world > 1:  # train.batch_size is the global batch: each rank takes its slice of every
                # batch (DDP averages the ranks' gradients: the one-process step when the slices are equal)
                batches = [idx[self.rank :: self.world] for idx in batches if len(idx) >= self.world]
            bar = tqdm(total=len(batches), initial=st.batch_in_epoch, desc=f"epoch {st.epoch + 1}/{t.epochs}",
                       disable=not self.is_main or self.progress is False, dynamic_ncols=True, leave=False)
            window_tokens, window_start = 0, time.monotonic()
            while st.batch_in_epoch < len(batches):
                batch = self.train_set.make_batch(batches[st.batch_in_epoch]).to(self.device)
                out = self.learner.step(
                    batch, st.step,
                    lambda rng: self.train_set.make_batch(batches[rng.randrange(len(batches))]).to(self.device))
                loss = out.loss
                st.step += 1
                st.batch_in_epoch += 1
                window_tokens += batch.num_tokens * self.world
                bar.update(1)
                if st.step % t.log_every == 0 or st.batch_in_epoch == len(batches):
                    elapsed = time.monotonic() - window_start
                    row = {"split": "train", "step": st.step, "epoch": st.epoch + 1, "loss": loss.item(),
                           "nll": -out.bound.mean().item(), "lr": self.optimizer.param_groups[0]["lr"],
                           "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                           "elapsed_s": time.monotonic() - start_time}
                    if out.kl is not None:
                        row["kl"], row["reconstruction"] = out.kl.mean().item(), -out.reconstruction.mean().item()
                    if out.extras and "kl_weight" in out.extras:
                        row["kl_weight"] = float(out.extras["kl_weight"])
                    self._log(row)
                    # per token: a per-sentence loss jumps with the batch's sentence lengths
                    postfix = {"nll_tok": f"{-out.bound.sum().item() / max(1, batch.num_tokens):.3f}",
                               "kl": f"{row.get('kl', 0):.2f}", "tok_s": f"{row['tokens_per_s']:.0f}"}
                    if self.collapse.warned_at is not None:
                        postfix["warn"] = "posterior collapse"
                    bar.set_postfix(postfix)
                    window_tokens, window_start = 0, time.monotonic()
                if self.aggressive is not None and self.aggressive.active and not self.aggressive.continue_at(st.step):
                    if self.is_main:
                        tqdm.write(f"step {st.step}: aggressive encoder phase over (step limit); normal training")
                # A checkpoint holds everything this step changed: taken after the phase switch
                # above, and after a validation that falls on this step (which checkpoints itself).
                # EM learners change parameters only at epoch ends: they validate and checkpoint there.
                if every_step and t.eval_every and st.step % t.eval_every == 0:
                    self._validate_and_schedule(per_epoch=False)
                elif every_step and st.step % t.checkpoint_every == 0:
                    self._checkpoint()
                if kill_at and st.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if (t.max_steps and st.step >= t.max_steps) or time.monotonic() > deadline:
                    st.stopped = "budget"
                    break
            bar.close()
            if st.stopped is None:
                row = self.learner.end_epoch(st.epoch)  # EM: the M-step
                if row:
                    self._log({"step": st.step, "epoch": st.epoch + 1, **row})
                    if row.get("stop"):
                        st.stopped = row["stop"]
                st.epoch += 1
                st.batch_in_epoch = 0
                if not t.eval_every or not every_step:
                    self._validate_and_schedule(per_epoch=True, checkpoint=False)
                if self.aggressive is not None and self.aggressive.active:
                    # the validation just run already measured I_q(x; z): do not redo it
                    mi = st.valid_mi if st.validated_at == st.step else None
                    still = self.aggressive.end_epoch(self.valid_set, cfg.eval.batch_size, mi=mi)
                    if self.is_main and not still:
                        tqdm.write(f"step {st.step}: aggressive encoder phase over; normal training from here")
                if not t.eval_every or not every_step:  # after the phase decision, so the checkpoint holds it
                    self._checkpoint()
        final = self._finish()
        return final

    def _validate_and_schedule(self, per_epoch: bool, checkpoint: bool = True) -> None:
        t, st = self.config.train, self.state
        metrics = validate(self.system, self.valid_set, self.config.eval.batch_size, t.precision)
        st.validated_at, st.valid_mi = st.step, metrics.get("mi")
        if self.system.posterior is not None and (warning := self.collapse.update(st.step, metrics)) and self.is_main:
            log.warning(warning)
            if self.progress is not False:
                tqdm.write("WARNING " + warning, file=sys.stderr)
        self._log({"split": "valid", "step": st.step, "epoch": st.epoch, "loss": metrics["nll"], **metrics,
                   "lr": self.optimizer.param_groups[0]["lr"]})
        if metrics["nll"] < st.best_valid - 1e-4:
            st.best_valid, st.bad_epochs = metrics["nll"], 0
            if self.is_main:
                save_weights(self.system, self.out / "model.safetensors")
        else:
            st.bad_epochs += 1
        self.scheduler.step(metrics["nll"])
        if st.bad_epochs >= t.early_stop_patience:
            st.stopped = "early stopping"
        elif self.learner.uses_optimizer and self.optimizer.param_groups[0]["lr"] < t.min_lr:
            st.stopped = "learning rate below train.min_lr"
        if self.is_main and (per_epoch or st.stopped):
            tqdm.write(f"step {st.step}: valid nll {metrics['nll']:.3f} kl {metrics['kl']:.3f} "
                       f"ppl<= {metrics['ppl_bound']:.2f}" + (f" ({st.stopped})" if st.stopped else ""))
        if checkpoint:
            self._checkpoint()

    def _check_replicas_agree(self) -> None:
        """DDP keeps replicas identical; a cheap fingerprint all-reduce proves it did."""
        with torch.no_grad():
            fp = torch.stack([p.double().sum() for p in self.system.parameters()]).sum().reshape(1)
        lo, hi = fp.clone(), fp.clone()
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"data-parallel replicas diverged: parameter fingerprints {float(lo)} != {float(hi)}")

    def _finish(self) -> dict[str, Any]:
        st = self.state
        if st.best_valid == math.inf or (st.stopped == "budget" and st.validated_at != st.step):
            # The budget ran out between validations: validate once more so the best model is on disk.
            self._validate_and_schedule(per_epoch=False, checkpoint=False)  # the checkpoint follows
        self._checkpoint()
        if self.world > 1:
            self._check_replicas_agree()
        return {"step": st.step, "epoch": st.epoch, "best_valid_nll": st.best_valid, "stopped": st.stopped or "epochs",
                "device": str(self.device)}
