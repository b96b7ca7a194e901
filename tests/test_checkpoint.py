"""Crash-proof checkpoints: a kill inside checkpoint writing, a corrupt latest checkpoint, permissions, RNG per rank."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from latentlm.io import atomic_write_text
from latentlm.training.checkpoint import (gather_rng_states, latest_checkpoint, load_checkpoint,
                                          save_checkpoint)

from conftest import REPO, write_tiny_corpus

TINY_VAE = REPO / "configs" / "tiny_vae.yaml"
# 120 sentences / 16 = 8 steps per epoch; 2 epochs.
BASE = ["train.epochs=2", "train.checkpoint_every=4", "train.log_every=2", "train.keep_checkpoints=3",
        "train.num_threads=1", "data.name=tiny"]
RUNS = {
    # validation every epoch: at step 8 the periodic checkpoint, then the validation's, share a step
    "per_epoch": BASE,
    # checkpoint_every == eval_every, as in every collapse config
    "eval_every": BASE + ["train.eval_every=4"],
    # the aggressive phase (He et al. 2019) is on for the whole first epoch
    "aggressive": BASE + ["train.checkpoint_every=2",
                          "train.aggressive={max_inner_steps: 3, check_every: 1, max_epochs: 1}"],
    # the collapse grid's IWAE row: k-sample bound, bf16 autocast, a plateau LR schedule
    "iwae_bf16": BASE + ["train.eval_every=4", "objective={type: iwae, samples: 3}", "train.precision=bf16-mixed",
                         "train.lr_patience=1"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """Uninterrupted runs, made once per module and shared by the tests that compare with them."""
    root, made = tmp_path_factory.mktemp("straight"), {}

    def get(name):
        if name not in made:
            _train(root / name, corpus, RUNS[name])
            made[name] = root / name
        return made[name]

    return get


def _train(out, corpus, sets, *extra, fault=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    env.pop("LATENTLM_FAULT", None)
    if fault:
        env["LATENTLM_FAULT"] = fault
    cmd = [sys.executable, "-m", "latentlm.cli.main", "train", str(TINY_VAE), "--out", str(out), "--quiet",
           "--data-dir", str(corpus), *[a for s in sets for a in ("--set", s)], *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _latest(run):
    return json.loads((run / "checkpoints" / "latest.json").read_text())


def _assert_same_run(a, b):
    """Bit-identical final checkpoint (weights, optimizers) and best model, and the same metric rows."""
    fa, fb = (run / "checkpoints" / _latest(run)["folder"] for run in (a, b))
    assert _latest(a)["step"] == _latest(b)["step"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(fa / name)), load_file(str(fb / name))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)
    best_a, best_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)

    def rows(run):
        with open(run / "metrics.csv") as fh:
            return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in csv.DictReader(fh)]

    assert rows(a) == rows(b)


@pytest.mark.parametrize("run, fault, resumes_from", [
    # killed while rewriting step 8 (the old code deleted the folder latest.json named here)
    ("per_epoch", "checkpoint:8:optimizer:2", 8),
    ("eval_every", "checkpoint:8:model", 4),
    ("eval_every", "checkpoint:12:rename", 8),  # renamed into place, latest.json not yet updated
    ("aggressive", "checkpoint:6:state", 4),    # the aggressive phase is on at steps 4 and 6
    ("iwae_bf16", "checkpoint:12:model", 8),
])
def test_kill_inside_checkpoint_writing_then_resume_is_bit_exact(tmp_path, corpus, straight, run, fault,
                                                                 resumes_from):
    killed = _train(tmp_path / "run", corpus, RUNS[run], fault=fault, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _latest(tmp_path / "run")["step"] == resumes_from
    state = json.loads((tmp_path / "run" / "checkpoints" / _latest(tmp_path / "run")["folder"] / "state.json")
                       .read_text())
    if run == "aggressive":
        assert state["aggressive"]["active"] is True
        assert any(k.startswith("aggressive.encoder_optimizer.state.")
                   for k in load_file(str(tmp_path / "run" / "checkpoints" / _latest(tmp_path / "run")["folder"]
                                          / "optimizer.safetensors")))
    _train(tmp_path / "run", corpus, RUNS[run], "--resume")
    _assert_same_run(straight(run), tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*")), "a killed write's folder is cleaned up"


def test_corrupt_latest_checkpoint_falls_back_and_the_resume_is_still_exact(tmp_path, corpus, straight):
    killed = _train(tmp_path / "run", corpus, RUNS["eval_every"], fault="checkpoint:12:pointer", check=False)
    assert killed.returncode == -9
    latest = tmp_path / "run" / "checkpoints" / _latest(tmp_path / "run")["folder"]
    with open(latest / "model.safetensors", "r+b") as fh:  # truncated, as by a full disk
        fh.truncate(100)
    resumed = _train(tmp_path / "run", corpus, RUNS["eval_every"], "--resume")
    assert "falling back to the previous good checkpoint" in resumed.stderr and "step-8." in resumed.stderr
    _assert_same_run(straight("eval_every"), tmp_path / "run")


# -- in-process: the checkpoint folder itself ------------------------------------------------
def _toy():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return module, optimizer


def test_a_second_checkpoint_at_the_same_step_gets_its_own_folder(tmp_path):
    module, optimizer = _toy()
    root = tmp_path / "checkpoints"
    first = save_checkpoint(root, 5, module, optimizer, {"n": 1}, keep=2)
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in first.iterdir()}
    (root / ".tmp-step-5.9").mkdir()  # what a killed write leaves behind
    second = save_checkpoint(root, 5, module, optimizer, {"n": 2}, keep=2)
    assert second != first and second.name.startswith("step-5.")
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in first.iterdir()} == before, "never rewritten"
    assert latest_checkpoint(root) == second
    third = save_checkpoint(root, 6, module, optimizer, {"n": 3}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest.json", second.name, third.name])


def _three_checkpoints(root):
    module, optimizer = _toy()
    return [save_checkpoint(root, step, module, optimizer, {}, keep=3) for step in (1, 2, 3)]


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 1)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected, falls_to", [
    (lambda folders, root: (root / "latest.json").write_text("{not json"), "latest.json is unreadable", -1),
    (lambda folders, root: (root / "latest.json").write_text('{"folder": "step-9.9"}'), "it is missing", -1),
    (lambda folders, root: (folders[-1] / "state.json").unlink(), "state.json is missing", -2),
    (lambda folders, root: (folders[-1] / "state.json").write_text('{"step": 3, "fi'), "state.json is unreadable", -2),
    (lambda folders, root: _truncate(folders[-1] / "model.safetensors"), "truncated", -2),
    (lambda folders, root: (folders[-1] / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing", -2),
    (lambda folders, root: _flip_a_byte(folders[-1] / "rng.safetensors"), "SHA-256", -2),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, damage, expected, falls_to):
    root = tmp_path / "checkpoints"
    folders = _three_checkpoints(root)
    damage(folders, root)
    with pytest.warns(UserWarning, match="falling back to the previous good checkpoint") as record:
        found = latest_checkpoint(root)
    assert expected in str(record[0].message)
    assert found == folders[falls_to]


def test_no_good_checkpoint_warns_and_finds_none(tmp_path):
    root = tmp_path / "checkpoints"
    for folder in _three_checkpoints(root):
        (folder / "state.json").unlink()
    with pytest.warns(UserWarning, match="no loadable checkpoint"):
        assert latest_checkpoint(root) is None


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_written_files_keep_the_permissions_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    module, optimizer = _toy()
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.json", "{}")
        atomic_write_text(tmp_path / "config.json", "{}")  # replacing, too
        folder = save_checkpoint(tmp_path / "checkpoints", 1, module, optimizer, {})
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == file_mode
    assert folder.stat().st_mode & 0o777 == dir_mode
    for path in [*folder.iterdir(), tmp_path / "checkpoints" / "latest.json"]:
        assert path.stat().st_mode & 0o777 == file_mode, path


def test_each_rank_restores_its_own_rng_state(tmp_path):
    module, optimizer = _toy()
    states = {}
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        states[rank] = torch.get_rng_state()
    rng = {f"rng.cpu.{rank}": state for rank, state in states.items()}
    folder = save_checkpoint(tmp_path, 1, module, optimizer, {}, rng=rng)
    for rank in (1, 0):
        torch.manual_seed(0)
        load_checkpoint(folder, module, optimizer, rank=rank)
        assert torch.equal(torch.get_rng_state(), states[rank])
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no RNG state for rank 2"):
        load_checkpoint(folder, module, optimizer, rank=2)


def test_single_process_rng_state_round_trips(tmp_path):
    module, optimizer = _toy()
    torch.manual_seed(7)
    torch.randn(3)
    gathered = gather_rng_states()
    assert set(k for k in gathered if k.startswith("rng.cpu.")) == {"rng.cpu.0"}
    expected = torch.randn(5)
    folder = save_checkpoint(tmp_path, 1, module, optimizer, {}, rng=gathered)
    torch.manual_seed(0)
    load_checkpoint(folder, module, optimizer)
    assert torch.equal(torch.randn(5), expected)


def _torchrun(out, corpus, *extra, fault=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LATENTLM_FAULT", None)
    if fault:
        env["LATENTLM_FAULT"] = fault
    sets = RUNS["per_epoch"] + ["train.checkpoint_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentlm.cli.main", "train", str(TINY_VAE), "--out", str(out), "--quiet", "--data-dir", str(corpus),
           *[a for s in sets for a in ("--set", s)], *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_data_parallel_kill_and_resume_restores_each_ranks_rng(tmp_path, corpus):
    """Two gloo ranks, word dropout drawing from each rank's own generator: the resumed run
    repeats the uninterrupted one only if each rank gets its own RNG state back."""
    _torchrun(tmp_path / "straight", corpus)
    killed = _torchrun(tmp_path / "run", corpus, fault="checkpoint:6:optimizer", check=False)
    assert killed.returncode != 0
    assert _latest(tmp_path / "run")["step"] == 4
    rng = load_file(str(tmp_path / "run" / "checkpoints" / _latest(tmp_path / "run")["folder"] / "rng.safetensors"))
    assert not torch.equal(rng["rng.cpu.0"], rng["rng.cpu.1"])
    _torchrun(tmp_path / "run", corpus, "--resume")
    _assert_same_run(tmp_path / "straight", tmp_path / "run")
