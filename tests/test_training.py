import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from latentlm.config import load_config
from latentlm.errors import CheckpointError, ConfigError, TrainingDivergedError
from latentlm.system import load_pretrained
from latentlm.training import train
from latentlm.training.trainer import load_corpus

from conftest import REPO

TINY_VAE = REPO / "configs" / "tiny_vae.yaml"
TINY_LM = REPO / "configs" / "tiny_lm.yaml"


def _valid_rows(run):
    with open(run / "metrics.csv") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == "valid"]


@pytest.mark.parametrize("config", [TINY_LM, TINY_VAE])
def test_tiny_training_run_lowers_validation_loss(tmp_path, config):
    cfg = load_config(config, ["train.epochs=3"])
    summary = train(cfg, tmp_path / "run", progress=False)
    rows = _valid_rows(tmp_path / "run")
    assert len(rows) == 3 and summary["epoch"] == 3
    nll = [float(r["nll"]) for r in rows]
    assert nll[-1] < nll[0] - 1.0, nll
    assert summary["best_valid_nll"] == pytest.approx(min(nll))


def test_checkpoint_save_load_gives_identical_outputs(tmp_path):
    cfg = load_config(TINY_VAE, ["train.epochs=1"])
    train(cfg, tmp_path / "run", progress=False)
    a, _, vocab = load_pretrained(tmp_path / "run")
    b, _, _ = load_pretrained(tmp_path / "run")
    _, data = load_corpus(cfg, vocab, splits=("valid",))
    batch = data["valid"].make_batch(range(8))
    for system in (a, b):
        torch.manual_seed(0)
        system.out = system(batch)
    torch.testing.assert_close(a.out.bound, b.out.bound, rtol=0, atol=0)
    stored = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert set(stored) == set(a.state_dict())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["type"] == "sentence_vae"


def _cli_train(out, *extra, env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "latentlm.cli.main", "train", str(TINY_VAE), "--out", str(out), "--quiet",
           "--set", "train.num_threads=1", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    _cli_train(tmp_path / "straight")
    killed = _cli_train(tmp_path / "killed", env_extra={"LATENTLM_KILL_AT_STEP": "27"}, check=False)
    assert killed.returncode == -9  # SIGKILL mid-epoch 2, after the step-20 checkpoint
    latest = json.loads((tmp_path / "killed" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 20
    _cli_train(tmp_path / "killed", "--resume")
    final = [json.loads((tmp_path / run / "checkpoints" / "latest.json").read_text()) for run in ("straight", "killed")]
    assert final[0]["step"] == final[1]["step"] == 38
    a, b = (load_file(str(tmp_path / run / "checkpoints" / f["folder"] / "model.safetensors"))
            for run, f in zip(("straight", "killed"), final))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(tmp_path / "killed" / "metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r["split"] == "train"]
    assert steps == sorted(set(steps)), "rows past the checkpoint must be dropped on resume"
    assert steps[:4] == [5, 10, 15, 19] and steps[-1] == 38, "the history up to the checkpoint is kept"


def test_resume_without_checkpoint_and_overwrite_are_refused(tmp_path):
    cfg = load_config(TINY_LM, ["train.max_steps=3"])
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(cfg, tmp_path / "run", progress=False)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from latentlm.models import LSTMLanguageModel

    calls = {"n": 0}
    original = LSTMLanguageModel.log_marginal

    def poisoned(self, batch):  # the 8th training batch produces a NaN loss
        calls["n"] += 1
        out = original(self, batch)
        return out * float("nan") if calls["n"] == 8 else out

    monkeypatch.setattr(LSTMLanguageModel, "log_marginal", poisoned)
    cfg = load_config(TINY_LM, ["train.checkpoint_every=5"])
    with pytest.raises(TrainingDivergedError, match="loss is not finite at step 8.*last good checkpoint"):
        train(cfg, tmp_path / "run", progress=False)
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 5
    state = load_file(str(tmp_path / "run" / "checkpoints" / latest["folder"] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TINY_LM, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="model.type 'nope' unknown"):
        from latentlm.system import build_system

        build_system(load_config(TINY_LM, ["model.type=nope"]), 10)
    with pytest.raises(ConfigError, match="needs a posterior"):
        from latentlm.system import build_system

        build_system(load_config(TINY_LM, ["objective.type=elbo"]), 10)


def test_bf16_mixed_precision_trains(tmp_path):
    cfg = load_config(TINY_VAE, ["train.precision=bf16-mixed", "train.epochs=2"])
    summary = train(cfg, tmp_path / "run", progress=False)
    nll = [float(r["nll"]) for r in _valid_rows(tmp_path / "run")]
    assert nll[-1] < nll[0] and summary["best_valid_nll"] < 200


def test_aggressive_encoder_phase_runs_through_the_trainer_and_resumes(tmp_path):
    cfg = load_config(TINY_VAE, ["train.epochs=2", "train.checkpoint_every=5",
                                 "train.aggressive={max_inner_steps: 3, check_every: 1, max_epochs: 1}"])
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["epoch"] == 2
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    state = json.loads((tmp_path / "run" / "checkpoints" / latest["folder"] / "state.json").read_text())
    assert state["aggressive"]["epochs_done"] == 1 and state["aggressive"]["active"] is False


def test_pretrain_hook_runs_two_stages(tmp_path):
    cfg = load_config(TINY_VAE, ["train.epochs=1", "train.pretrain_encoder_epochs=1"])
    train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_budget_stop_on_a_validation_step_does_not_validate_twice(tmp_path):
    cfg = load_config(TINY_LM, ["train.max_steps=6", "train.eval_every=3"])
    train(cfg, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r["split"] == "valid"]
    assert steps == [3, 6]
