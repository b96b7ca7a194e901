"""configs/ptb/collapse/*.yaml: every row of the issue-6 table builds and takes a training step;
and the encoder-pretraining remedy (Li et al. 2019) starts stage 2 from stage 1's encoder."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from latentlm.config import TrainConfig, config_from_dict, load_config
from latentlm.system import build_system
from latentlm.training.aggressive import AggressiveEncoderTraining
from latentlm.training.pretrain import EncoderInitializedTrainer, autoencoder_config, pretrain_then_train
from latentlm.training.trainer import load_corpus, make_optimizer

from conftest import REPO

COLLAPSE = sorted((REPO / "configs" / "ptb" / "collapse").glob("*.yaml"))
#: train-section keys that switch on trainer hooks (training/aggressive.py, training/pretrain.py)
HOOK_KEYS = ("aggressive", "pretrain_encoder_epochs")


def test_every_row_of_the_table_has_a_config():
    names = [p.stem.split("_", 1)[1] for p in COLLAPSE]
    assert names == ["lm", "vae", "kl_annealing", "word_dropout", "free_bits", "cyclical", "aggressive",
                     "pretrain_free_bits", "sa_vae", "iwae", "planar_flow", "iaf", "cnn_decoder", "bow_decoder"]


def _tiny_config(path: Path, corpus: Path):
    raw = yaml.safe_load(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    hooks = {k: raw["train"].pop(k) for k in HOOK_KEYS if k in raw["train"] and k not in known}
    raw["data"] = {"name": "tiny", "data_dir": str(corpus)}
    config = config_from_dict(raw)
    hooks.update({k: getattr(config.train, k) for k in HOOK_KEYS if k in known})
    return config, hooks


@pytest.mark.parametrize("path", [*COLLAPSE, REPO / "configs" / "ptb" / "bow_vae.yaml"], ids=lambda p: p.stem)
def test_config_builds_and_takes_one_training_step(path, tiny_corpus):
    config, hooks = _tiny_config(path, tiny_corpus)
    ref = yaml.safe_load((REPO / "configs" / "ptb" / "vae.yaml").read_text())
    if path.parent.name == "collapse":
        for key in ("embed_dim", "hidden_dim"):  # same architecture as configs/ptb/vae.yaml
            assert config.model[key] == ref["model"][key]
    torch.manual_seed(0)
    vocab, data = load_corpus(config, splits=("train", "valid"))
    system = build_system(config, len(vocab)).train()
    optimizer = make_optimizer(config, system.parameters())
    batch = data["train"].make_batch(range(config.train.batch_size))
    aggressive = None
    if hooks.get("aggressive"):
        aggressive = AggressiveEncoderTraining.from_config({**hooks["aggressive"], "max_inner_steps": 3}, system,
                                                           lr=config.train.lr, clip=config.train.clip)
        result = aggressive.train_encoder(system, batch, lambda: data["train"].make_batch(range(8)), step=0)
        assert result.steps == 3
    before = [p.detach().clone() for p in system.parameters()]
    out = system(batch, 0)
    optimizer.zero_grad()
    out.loss.backward()
    if aggressive is not None:
        aggressive.before_optimizer_step()
    optimizer.step()
    assert torch.isfinite(out.loss) and out.bound.shape == (batch.size,)
    assert any(not torch.equal(a, b) for a, b in zip(before, system.parameters()))
    if system.posterior is not None:
        assert out.kl is not None and torch.isfinite(out.kl).all()
    system.eval()
    with torch.no_grad():  # validation path
        ev = system(data["valid"].make_batch(range(8)))
    assert torch.isfinite(ev.bound).all()


def test_pretraining_stage_two_starts_from_stage_one_encoder_with_a_fresh_decoder(tmp_path, tiny_corpus):
    overrides = ["data.name=tiny", f"data.data_dir={tiny_corpus}", "train.epochs=1", "train.num_threads=1",
                 "objective.free_bits=0.1"]
    config = load_config(REPO / "configs" / "tiny_vae.yaml", overrides)
    ae = autoencoder_config(config, epochs=1)
    assert ae.objective == {"type": "elbo", "samples": 1, "kl_schedule": 0.0} and ae.train.epochs == 1
    summary = pretrain_then_train(config, tmp_path / "run", pretrain_epochs=1, progress=False)
    assert summary["epoch"] == 1
    stage1 = load_file(str(tmp_path / "run" / "pretrain" / "model.safetensors"))
    # stage 2 at its start: encoder = stage 1's, decoder = a fresh initialization
    trainer = EncoderInitializedTrainer(config, tmp_path / "fresh", tmp_path / "run" / "pretrain" / "model.safetensors",
                                        progress=False)
    trainer._setup()
    trainer._metrics_fh.close()
    state = trainer.system.state_dict()
    enc = [k for k in state if k.startswith("posterior.")]
    dec = [k for k in state if k.startswith("model.")]
    assert enc and all(torch.equal(state[k], stage1[k]) for k in enc)
    assert any(not torch.equal(state[k], stage1[k]) for k in dec)
