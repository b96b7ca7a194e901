"""The CUDA half of "any device": run by ``make gpu-check`` (``pytest -m cuda``) on a machine
with a GPU; skipped with a reason elsewhere (the ``cuda`` marker, see ``conftest.py``).

Each test compares the GPU with the CPU on the same tiny inputs, so a tensor left on the
wrong device (a crash) and a kernel that computes something else (a mismatch) both show.
"""

from __future__ import annotations

import pytest
import torch

from latentlm.config import load_config
from latentlm.data.batching import TextDataset
from latentlm.data.corpus import read_lines, split_path
from latentlm.data.vocab import Vocab
from latentlm.device import device_generator, module_device
from latentlm.evaluation import evaluate, interpolate, sample_sentences
from latentlm.models.hmm import HMM
from latentlm.precision import autocast
from latentlm.structured import hmm_marginals, hmm_sample, hmm_viterbi
from latentlm.system import build_system, load_pretrained
from latentlm.training import load_corpus, train

from conftest import REPO

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)


def _tiny(tiny_corpus, *extra):
    return load_config(REPO / "configs" / "tiny_vae.yaml",
                       [f"data.data_dir={tiny_corpus}", "data.name=tiny", "train.epochs=3", "train.max_steps=12",
                        "train.checkpoint_every=6", "train.eval_every=6", *extra])


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_tiny_vae_trains_resumes_and_evaluates_on_cuda(tmp_path, tiny_corpus, precision):
    config = _tiny(tiny_corpus, "train.device=cuda", f"train.precision={precision}")
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["device"] == "cuda:0" and summary["step"] == 12
    assert summary["best_valid_nll"] < float("inf")
    # resume from a checkpoint (weights and optimizer state saved from CUDA, read to the CPU, moved back)
    config.train.max_steps = 15
    assert train(config, tmp_path / "run", resume=True, progress=False)["step"] == 15

    system, config, vocab = load_pretrained(tmp_path / "run", device="cuda")
    assert module_device(system) == CUDA
    _, data = load_corpus(config, vocab, splits=("test",))
    result = evaluate(system, data["test"], samples=5, batch_size=10, precision=precision)
    assert result["device"] == "cuda:0"
    assert 0 < result["nll"] < float("inf") and result["nll"] <= -result["elbo"] + 1.0
    assert result["mi"] >= -0.1 and 0 <= result["au"] <= 4

    # the same weights on the CPU give the same fp32 log p(x) bound up to kernel differences
    if precision == "fp32":
        cpu_system, _, _ = load_pretrained(tmp_path / "run", device="cpu")
        batch = data["test"].make_batch(list(range(10)))
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 LSTM kernels
            on_cpu = cpu_system.model.log_likelihood(batch, torch.zeros(1, 10, 4))
            on_gpu = system.model.log_likelihood(batch.to(CUDA), torch.zeros(1, 10, 4, device=CUDA)).cpu()
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=5e-3)

    gen = device_generator(0, "cuda")
    assert len(sample_sentences(system.model, vocab, 3, generator=gen)) == 3
    assert len(interpolate(system.model, system.posterior, vocab, ["the", "cat"], ["a", "dog"], steps=3)) == 3


def _hmm_inputs(tiny_corpus, K=6):
    lines = read_lines(split_path(tiny_corpus, "train")).lines
    vocab = Vocab.build(lines)
    data = TextDataset(lines[:40], vocab)
    batch = data.make_batch(list(range(40)))
    return HMM(len(vocab), K, seed=0).double(), batch


def test_hmm_forward_backward_on_cuda_matches_the_cpu(tiny_corpus):
    model, batch = _hmm_inputs(tiny_corpus)
    results = {}
    for device in ("cpu", "cuda"):
        m = HMM(model.vocab_size, model.num_states).double().to(device)
        m.load_state_dict(model.state_dict())
        b = batch.to(device)
        ll = m.log_marginal(b)
        ll.sum().backward()
        init, trans, unary, n = m.chain_scores(*m.log_probs(), b)
        with torch.no_grad():
            marg = hmm_marginals(init, trans, unary, n)
            tags = m.tag(b)
        results[device] = [t.detach().cpu() for t in (ll, m.emit_logits.grad, m.trans_logits.grad, marg, tags)]
        assert ll.device.type == device and m.emit_logits.grad.device.type == device
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-8)

    # exact posterior samples and Viterbi on the GPU, with a GPU generator
    m = model.to("cuda")
    init, trans, unary, n = m.chain_scores(*m.log_probs(), batch.to("cuda"))
    z = hmm_sample(init.detach(), trans.detach(), unary.detach(), n, num_samples=4,
                   generator=device_generator(0, "cuda"))
    assert z.device.type == "cuda" and z.shape[:2] == (4, batch.size)
    path, score = hmm_viterbi(init.detach(), trans.detach(), unary.detach(), n)
    assert path.device.type == "cuda" and torch.isfinite(score).all()


def test_bf16_autocast_on_cuda():
    x, w = torch.randn(8, 16, device="cuda"), torch.randn(16, 4, device="cuda")
    with autocast("bf16-mixed", x):
        assert torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")
        assert (x @ w).dtype == torch.bfloat16
    with autocast("bf16-mixed", "cpu"):  # CPU tensors beside a GPU still get CPU autocast
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")


def test_sentence_vae_step_under_cuda_bf16_keeps_fp32_weights(tiny_corpus):
    config = _tiny(tiny_corpus)
    vocab, data = load_corpus(config, splits=("train",))
    system = build_system(config, len(vocab)).to("cuda")
    batch = data["train"].make_batch(list(range(16))).to("cuda")
    with autocast("bf16-mixed", "cuda"):
        out = system(batch, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.bound.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.device.type == "cuda"
               for p in system.parameters() if p.requires_grad)
