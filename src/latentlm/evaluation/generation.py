"""E3: samples from the prior, reconstructions and interpolations (homotopies)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentlm.data.batching import collate
from latentlm.data.vocab import Vocab
from latentlm.device import module_device
from latentlm.inference.flows import FlowDistribution


def _detok(vocab: Vocab, ids: torch.Tensor) -> list[str]:
    return [" ".join(vocab.decode(row)) for row in ids.tolist()]


@torch.no_grad()
def sample_sentences(model, vocab: Vocab, num: int = 3, greedy: bool = False, max_len: int = 50,
                     generator: torch.Generator | None = None) -> list[str]:
    """``num`` sentences from the model (z from the prior for a latent model); a ``generator``
    must live on the model's device (``latentlm.device.device_generator``)."""
    z = model.prior().sample((num,)) if model.latent != "none" else None
    return _detok(vocab, model.generate(z, num, max_len=max_len, greedy=greedy, generator=generator))


def encode_means(posterior, vocab: Vocab, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
    """One code per sentence (N, D): q's mean, or for a flow q (no closed-form mean) the flow's
    image of its base Gaussian's mean — deterministic, like the mean."""
    batch = collate([vocab.encode_sentence(s) for s in sentences], range(len(sentences))).to(module_device(posterior))
    q = posterior(batch)
    if isinstance(q, FlowDistribution):
        return q.transform(q.base.mean)[0]
    return q.mean


def decoding_cap(sentences: Sequence[Sequence[str]], max_len: int | None = None) -> int:
    """Tokens a decoding from these sentences' codes may take before it is cut: ``max_len``
    if given, else twice the longest input plus 5 (at most 50). Decoding stops at ``</s>``
    anyway; the cap only bounds a decoder that repeats itself ("$ N million or $ N million ...")."""
    if max_len is not None:
        return max_len
    return min(50, 2 * max((len(s) for s in sentences), default=10) + 5)


@torch.no_grad()
def reconstruct(model, posterior, vocab: Vocab, sentences: Sequence[Sequence[str]], max_len: int | None = None,
                greedy: bool = True, generator: torch.Generator | None = None) -> list[str]:
    """Decoding from each sentence's code (:func:`encode_means`): greedy, or sampled (``greedy=False``);
    stops at ``</s>`` or at :func:`decoding_cap`."""
    z = encode_means(posterior, vocab, sentences)
    ids = model.generate(z, len(sentences), max_len=decoding_cap(sentences, max_len), greedy=greedy,
                         generator=generator)
    return [" ".join(vocab.decode(row[: decoding_cap([s], max_len)])) for row, s in zip(ids.tolist(), sentences)]


@torch.no_grad()
def interpolate(model, posterior, vocab: Vocab, a: Sequence[str], b: Sequence[str], steps: int = 5,
                max_len: int | None = None, greedy: bool = True, generator: torch.Generator | None = None) -> list[str]:
    """Decodings (greedy, or sampled with ``greedy=False``) along the line between the posterior
    means of ``a`` and ``b``; each stops at ``</s>`` or at :func:`decoding_cap`."""
    if steps < 2:
        raise ValueError(f"interpolation needs at least 2 steps, got {steps}")
    za, zb = encode_means(posterior, vocab, [a, b])
    t = torch.linspace(0, 1, steps, device=za.device)[:, None]
    z = (1 - t) * za + t * zb  # (steps, D)
    return _detok(vocab, model.generate(z, steps, max_len=decoding_cap([a, b], max_len), greedy=greedy,
                                        generator=generator))
