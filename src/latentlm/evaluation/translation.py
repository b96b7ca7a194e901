"""Decoding a :class:`~latentlm.models.base.ConditionalGenerator` and scoring it with BLEU.

Beam search runs over a whole batch of source sentences at once (``beam`` rows each) and
ranks finished hypotheses by their log-probability divided by their length (tokens incl.
``</s>``; ``length_penalty`` is that length's exponent, 0 = raw scores). A sentence is done
when it holds ``beam`` finished hypotheses; at ``max_len`` the live ones count as finished.
With ``beam=1`` it is greedy decoding (:func:`greedy_decode`, tested to agree).

BLEU is sacrebleu's corpus BLEU on the references as they are in the files (the data are
already tokenized and lower-cased, so ``tokenize="none"``); ``bleu_signature`` says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from latentlm.data.parallel import ParallelDataset, collate_pairs, encode_source
from latentlm.data.vocab import Vocab
from latentlm.device import module_device
from latentlm.models.base import ConditionalGenerator
from latentlm.precision import autocast


def _banned(log_probs: torch.Tensor) -> torch.Tensor:
    log_probs[:, Vocab.pad_id] = -math.inf
    log_probs[:, Vocab.bos_id] = -math.inf
    return log_probs


@torch.no_grad()
def greedy_decode(model: ConditionalGenerator, batch, max_len: int = 80) -> list[list[int]]:
    """The most likely next token at every step, until ``</s>`` (not included) or ``max_len``."""
    state = model.start(batch)
    previous = torch.full((batch.size,), Vocab.bos_id, dtype=torch.long, device=batch.source.device)
    out: list[list[int]] = [[] for _ in range(batch.size)]
    done = [False] * batch.size
    for _ in range(max_len):
        log_probs, state = model.step(state, previous)
        previous = _banned(log_probs).argmax(-1)
        for row, token in enumerate(previous.tolist()):
            if not done[row]:
                if token == Vocab.eos_id:
                    done[row] = True
                else:
                    out[row].append(token)
        if all(done):
            break
    return out


@torch.no_grad()
def beam_search(model: ConditionalGenerator, batch, beam: int = 5, max_len: int = 80,
                length_penalty: float = 1.0) -> list[list[int]]:
    """The best finished hypothesis per source sentence (token ids without ``</s>``)."""
    B, device = batch.size, batch.source.device
    state = model.select(model.start(batch), torch.arange(B, device=device).repeat_interleave(beam))
    scores = torch.full((B, beam), -math.inf, device=device)
    scores[:, 0] = 0.0  # one live hypothesis per sentence at the start
    history = torch.zeros((B * beam, 0), dtype=torch.long, device=device)
    previous = torch.full((B * beam,), Vocab.bos_id, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B

    def normalized(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    for t in range(max_len):
        log_probs, state = model.step(state, previous)
        V = log_probs.size(-1)
        total = (scores.reshape(-1, 1) + _banned(log_probs.float())).view(B, beam * V)
        cand_scores, cand = total.topk(min(2 * beam, beam * V), dim=1)
        cand_scores, cand = cand_scores.tolist(), cand.tolist()
        rows = torch.zeros((B, beam), dtype=torch.long)
        tokens = torch.full((B, beam), Vocab.eos_id, dtype=torch.long)
        new_scores = torch.full((B, beam), -math.inf)
        hist_cpu = None
        for b in range(B):
            rows[b] = b * beam
            if done[b]:
                continue
            k = 0
            for s, idx in zip(cand_scores[b], cand[b]):
                if s == -math.inf:
                    break
                src, token = b * beam + idx // V, idx % V
                if token == Vocab.eos_id:
                    if hist_cpu is None:
                        hist_cpu = history.cpu()
                    finished[b].append((normalized(s, t + 1), hist_cpu[src].tolist()))
                else:
                    rows[b, k], tokens[b, k], new_scores[b, k] = src, token, s
                    k += 1
                    if k == beam:
                        break
            if len(finished[b]) >= beam or k == 0:
                done[b] = True
        if all(done):
            break
        rows, tokens = rows.view(-1).to(device), tokens.view(-1).to(device)
        state = model.select(state, rows)
        history = torch.cat([history[rows], tokens[:, None]], 1)
        scores = new_scores.to(device).masked_fill(torch.tensor(done, device=device)[:, None], -math.inf)
        previous = tokens
    else:  # out of length: the live hypotheses count as finished
        live = history.cpu()
        for b in range(B):
            for k in range(beam):
                s = float(scores[b, k])
                if s > -math.inf:
                    finished[b].append((normalized(s, max_len), live[b * beam + k].tolist()))
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


@torch.no_grad()
def translate_sentences(system, sentences: Sequence[Sequence[str]], vocab: Vocab, beam: int = 5,
                        batch_size: int = 100, max_len: int = 80, precision: str = "fp32",
                        progress: bool = False) -> list[list[str]]:
    """Translate tokenized source sentences (unknown words map to ``<unk>``; an empty
    sentence gives an empty translation), in input order."""
    from tqdm.auto import tqdm

    model = system.model
    if not isinstance(model, ConditionalGenerator):
        raise TypeError(f"{type(model).__name__} does not translate (it is not a ConditionalGenerator)")
    system.eval()
    device = module_device(system)
    out: list[list[str]] = [[] for _ in sentences]
    order = sorted((i for i, s in enumerate(sentences) if s), key=lambda i: len(sentences[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="translate", disable=not progress, leave=False):
        idx = order[start: start + batch_size]
        sources = [encode_source(vocab.source, sentences[i]) for i in idx]
        dummy = [torch.tensor([Vocab.bos_id, Vocab.eos_id]) for _ in idx]
        batch = collate_pairs(sources, dummy, idx).to(device)
        with autocast(precision, device):
            ids = beam_search(model, batch, beam, max_len) if beam > 1 else greedy_decode(model, batch, max_len)
        for i, hyp in zip(idx, ids):
            out[i] = vocab.decode(hyp)
    return out


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """(sacrebleu corpus BLEU, its signature) of detokenization-free, pre-tokenized text."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize="none", force=True)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def translation_metrics(system, dataset: ParallelDataset, beam: int = 5, batch_size: int = 100, max_len: int = 80,
                        precision: str = "fp32", progress: bool = False) -> dict:
    """BLEU of beam-search translations of every source sentence of ``dataset`` against its
    references, with the decoding time."""
    start = time.perf_counter()
    hyps = translate_sentences(system, dataset.source_words, dataset.vocab, beam, batch_size, max_len, precision,
                               progress)
    seconds = time.perf_counter() - start
    bleu, signature = corpus_bleu([" ".join(h) for h in hyps], [" ".join(r) for r in dataset.target_words])
    return {"bleu": bleu, "bleu_signature": signature, "beam": beam, "decode_s": seconds,
            "translations": [" ".join(h) for h in hyps]}
