"""Multi-process data-parallel training with torch.distributed (DDP over gloo on CPU)."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentlm.cli.main", "train", str(REPO / "configs" / "tiny_lm.yaml"), "--out", str(out),
           "--quiet", "--set", "train.epochs=3", "--set", "train.num_threads=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    valid = [float(r["nll"]) for r in rows if r["split"] == "valid"]
    assert len(valid) == 3 and valid[-1] < valid[0] - 1.0
    # train.batch_size is the global batch: 19 batches of 16 per epoch, each rank takes 8 of every one
    assert max(int(r["step"]) for r in rows) == 57
    assert (out / "model.safetensors").is_file()
    # the checkpoint holds every rank's CPU generator (gathered with all_gather, no pickles)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    rng = load_file(str(out / "checkpoints" / latest["folder"] / "rng.safetensors"))
    assert {k for k in rng if k.startswith("rng.cpu.")} == {"rng.cpu.0", "rng.cpu.1"}


def _train(out, config: str, procs: int, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "src")])}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
              if procs > 1 else [sys.executable])
    cmd = [*launch, str(REPO / "tests" / "ddp_worker.py"), "train", str(REPO / "configs" / f"{config}.yaml"),
           "--out", str(out), "--quiet", "--device", "cpu", *(a for o in overrides for a in ("--set", o))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _final_weights(out) -> dict[str, torch.Tensor]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(str(out / "checkpoints" / latest["folder"] / "model.safetensors"))


def _valid_rows(out) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == "valid"]


@pytest.mark.parametrize("config", ["tiny_lm", "tiny_vae"])
def test_two_ranks_with_global_batch_b_equal_one_process_with_batch_b(tmp_path, config):
    """2 ranks x 8 examples (gloo, DDP's gradient average) == 1 process x 16 examples, step for
    step: the same parameters after 10 Adam steps and the same validation numbers (the ranks'
    sums all-reduced). Sampling is pinned (no word dropout, z = posterior mean; tests/ddp_worker.py)."""
    overrides = ["train.max_steps=10", "train.eval_every=5", "train.batch_size=16", "train.num_threads=1",
                 "model.word_dropout=0", "data.train_limit=160"]  # 10 full batches of 16
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, config, 1, overrides)
    _train(two, config, 2, overrides)
    a, b = _final_weights(one), _final_weights(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{config} {name}: {m}")
    rows_one, rows_two = _valid_rows(one), _valid_rows(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == ["5", "10"]
    for r1, r2 in zip(rows_one, rows_two):
        for key in ("nll", "kl", "mi", "au"):
            if r1[key]:
                assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-4, abs=1e-4), (config, key, r1, r2)
