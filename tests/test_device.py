"""Any device, checked on the CPU: ``train.device`` / ``--device`` resolution, autocast that
follows the tensors' device type, batches and runs that go where they are told.
(The CUDA half is ``tests/test_cuda.py``, run by ``make gpu-check`` on a GPU machine.)"""

from __future__ import annotations

import json

import pytest
import torch

from latentlm.cli.main import main
from latentlm.config import load_config
from latentlm.data.batching import collate
from latentlm.data.documents import BowBatch
from latentlm.device import device_generator, module_device, resolve_device
from latentlm.errors import ConfigError
from latentlm.evaluation.latent import mutual_information
from latentlm.precision import autocast
from latentlm.system import load_pretrained
from latentlm.training import train

from conftest import REPO

TINY_VAE = REPO / "configs" / "tiny_vae.yaml"
NO_CUDA = not torch.cuda.is_available()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    for bad in ("gpu", "cuda:x", "tpu:0", "mps"):
        with pytest.raises(ConfigError, match="auto | cpu"):
            resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="checks the message for a missing GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_config_error():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            resolve_device(spec)


def test_autocast_follows_the_device_type_of_the_tensors():
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    for where in (x, x.device, "cpu"):
        with autocast("bf16-mixed", where):
            # CPU tensors need CPU autocast, GPU present or not (the old switch picked CUDA's)
            assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
            assert (x @ w).dtype == torch.bfloat16
    with autocast("fp32", x):
        assert not torch.is_autocast_enabled("cpu") and (x @ w).dtype == torch.float32
    with pytest.raises(ConfigError, match="precision"):
        autocast("fp16", x)


def test_batches_move_to_a_device():
    batch = collate([torch.tensor([1, 5, 6, 2]), torch.tensor([1, 7, 2])], [0, 1])
    moved = batch.to("meta")  # a second device that every machine has
    assert {moved.tokens.device.type, moved.lengths.device.type, moved.index.device.type} == {"meta"}
    assert batch.to("cpu").tokens.device.type == "cpu"
    bow = BowBatch(torch.ones(2, 5), torch.tensor([5, 5]), torch.tensor([0, 1]), torch.tensor([1, -1]))
    moved = bow.to("meta")
    assert moved.counts.device.type == moved.labels.device.type == "meta"


def test_module_device_and_device_generator():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.Linear(2, 2, device="meta")).type == "meta"
    assert module_device(torch.nn.Identity()) == torch.device("cpu")
    gen = device_generator(3, "cpu")
    assert gen.device.type == "cpu" and torch.equal(torch.rand(3, generator=gen),
                                                    torch.rand(3, generator=torch.Generator().manual_seed(3)))


def test_mutual_information_draws_on_the_generators_device():
    """The noise comes from the generator's device, so a CPU generator gives the same MI for
    means on any device; with no generator it follows the means."""
    means, logvars = torch.randn(50, 3), torch.zeros(50, 3) - 1
    a = mutual_information(means, logvars, generator=torch.Generator().manual_seed(0))
    b = mutual_information(means, logvars, generator=torch.Generator().manual_seed(0))
    assert a == b and a > 0
    assert mutual_information(means, logvars) > 0


def _tiny(tiny_corpus, *extra):
    return load_config(TINY_VAE, [f"data.data_dir={tiny_corpus}", "data.name=tiny", "train.max_steps=3",
                                  "train.epochs=1", "train.checkpoint_every=100", *extra])


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_train_device_cpu_and_auto(tmp_path, tiny_corpus, device):
    summary = train(_tiny(tiny_corpus, f"train.device={device}"), tmp_path / "run", progress=False)
    expected = "cpu" if device == "cpu" or NO_CUDA else "cuda:0"
    assert summary["device"] == expected and summary["step"] == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["device"] == device
    # weights are read to the CPU and moved: None means "where the run trained"
    system, _, _ = load_pretrained(tmp_path / "run", device=None)
    assert str(module_device(system)) == expected
    system, _, _ = load_pretrained(tmp_path / "run")  # the Python API's default stays the CPU
    assert module_device(system).type == "cpu"


def test_train_device_default_is_auto_and_bad_values_stop_early(tmp_path, tiny_corpus):
    assert load_config(TINY_VAE).train.device == "auto"
    with pytest.raises(ConfigError, match="train.device"):
        train(_tiny(tiny_corpus, "train.device=gpu0"), tmp_path / "run", progress=False)


def test_cli_device_options(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", str(TINY_VAE), "--out", str(run), "--quiet", "--device", "cpu", "--data-dir",
                 str(tiny_corpus), "--set", "data.name=tiny", "--set", "train.max_steps=3"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["device"] == "cpu"
    assert main(["evaluate", str(run), "--samples", "3", "--json", "--device", "cpu", "--data-dir",
                 str(tiny_corpus)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and result["nll"] > 0
    assert main(["evaluate", str(run), "--samples", "3", "--json", "--device", "auto", "--limit", "5",
                 "--data-dir", str(tiny_corpus), "--precision", "bf16-mixed"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == ("cpu" if NO_CUDA else "cuda:0")
    assert main(["sample", str(run), "-n", "2", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["interpolate", str(run), "the cat", "a dog", "--steps", "3", "--device", "auto"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["reconstruct", str(run), "the cat sat", "--device", "cpu"]) == 0
    if NO_CUDA:
        assert main(["evaluate", str(run), "--device", "cuda", "--data-dir", str(tiny_corpus)]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err


def test_tag_device_option(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "hmm"
    assert main(["train", str(REPO / "configs" / "tiny_hmm.yaml"), "--out", str(run), "--quiet", "--data-dir",
                 str(tiny_corpus), "--set", "data.name=tiny", "--set", "train.max_steps=3"]) == 0
    capsys.readouterr()
    tsv = tmp_path / "gold.tsv"
    tsv.write_text("the\tDT\ncat\tNN\nsat\tVBD\n\na\tDT\ndog\tNN\n\n")
    assert main(["tag", str(run), "--data", str(tsv), "--json", "--states", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [len(s) for s in result["states"]] == [3, 2] and "many_to_one" in result
