"""E5: document clustering scores and reports.

NMI (scikit-learn's, arithmetic normalization) and purity against gold labels, how many
clusters are used, the most characteristic words of each cluster, and the k-means on
tf-idf baseline the issue compares against. :func:`cluster_documents` gathers all of it
for ``latentlm cluster``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from latentlm.data.documents import BagOfWords
from latentlm.data.vocab import SPECIALS, Vocab


def _as_labels(x: Sequence[int] | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one label per document (N,), got shape {arr.shape}")
    return arr.astype(np.int64)


def _check_pair(labels, assignments) -> tuple[np.ndarray, np.ndarray]:
    gold, pred = _as_labels(labels, "labels"), _as_labels(assignments, "assignments")
    if gold.shape != pred.shape:
        raise ValueError(f"{gold.shape[0]} labels but {pred.shape[0]} assignments")
    if gold.size == 0:
        raise ValueError("no documents to score")
    return gold, pred


def nmi(labels, assignments) -> float:
    """Normalized mutual information (arithmetic mean normalization, scikit-learn's default)."""
    from sklearn.metrics import normalized_mutual_info_score

    gold, pred = _check_pair(labels, assignments)
    return float(normalized_mutual_info_score(gold, pred))


def purity(labels, assignments) -> float:
    """Fraction of documents whose cluster's majority label is their own label."""
    gold, pred = _check_pair(labels, assignments)
    _, pred_idx = np.unique(pred, return_inverse=True)
    _, gold_idx = np.unique(gold, return_inverse=True)
    table = np.zeros((pred_idx.max() + 1, gold_idx.max() + 1), dtype=np.int64)  # (clusters, labels)
    np.add.at(table, (pred_idx, gold_idx), 1)
    return float(table.max(axis=1).sum() / gold.size)


def cluster_usage(assignments, num_clusters: int) -> dict:
    """Documents per cluster (K,), how many clusters hold any, and the usage entropy in nats."""
    pred = _as_labels(assignments, "assignments")
    if pred.size and (pred.min() < 0 or pred.max() >= num_clusters):
        raise ValueError(f"assignments must lie in [0, {num_clusters}), got [{pred.min()}, {pred.max()}]")
    sizes = np.bincount(pred, minlength=num_clusters)
    p = sizes[sizes > 0] / max(pred.size, 1)
    return {
        "sizes": sizes.tolist(),
        "used": int((sizes > 0).sum()),
        "entropy": float(-(p * np.log(p)).sum()) if p.size else 0.0,
    }


def top_words(
    log_word_probs: torch.Tensor, vocab: Vocab, n: int = 10, background: torch.Tensor | None = None
) -> list[list[str]]:
    """The ``n`` most characteristic words of each cluster.

    ``log_word_probs`` is (K, V) log pi. Without ``background`` words are ranked by pi_k,
    which favours words frequent everywhere; with a (V,) background distribution (e.g. the
    corpus unigram) they are ranked by pi_k * log(pi_k / background), the word's
    contribution to KL(pi_k || background) — frequent *and* specific. Specials never show.
    """
    if log_word_probs.dim() != 2 or log_word_probs.size(1) != len(vocab):
        raise ValueError(f"log-probs {tuple(log_word_probs.shape)} do not match a vocabulary of {len(vocab)}")
    scores = log_word_probs.detach().double().cpu()
    if background is not None:
        log_bg = torch.log(background.detach().double().cpu().clamp_min(1e-300))
        scores = torch.where(torch.isfinite(scores), scores.exp() * (scores - log_bg), torch.tensor(-math.inf))
    special = [vocab.stoi[s] for s in SPECIALS if s in vocab.stoi]
    scores[:, special] = -math.inf
    k = min(n, max(len(vocab) - len(special), 0))
    top = scores.topk(k, dim=-1).indices
    return [[vocab.itos[i] for i in row.tolist()] for row in top]


def kmeans_tfidf(counts: sp.spmatrix, num_clusters: int, seed: int = 0, n_init: int = 10,
                 predict: sp.spmatrix | None = None) -> np.ndarray:
    """Baseline: k-means (scikit-learn) on L2-normalized tf-idf of the same count matrix.

    Uses the same vocabulary as the mixture so the comparison is about the model, not the
    features. Returns cluster ids (N,) of ``counts``' rows, or, given ``predict`` (other
    documents over the same vocabulary), the nearest fitted centroid of each of those.
    """
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfTransformer

    transformer = TfidfTransformer()
    tfidf = transformer.fit_transform(sp.csr_matrix(counts))  # (N, V), rows L2-normalized
    km = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
    fitted = km.fit_predict(tfidf).astype(np.int64)
    if predict is None:
        return fitted
    return km.predict(transformer.transform(sp.csr_matrix(predict))).astype(np.int64)


def _perplexity(log_likelihood: float, num_tokens: int) -> float:
    if num_tokens == 0:
        return float("nan")
    nll = -log_likelihood / num_tokens
    return math.exp(nll) if nll < 700 else math.inf  # unsmoothed models give held-out -inf


def score_assignments(labels, assignments, num_clusters: int) -> dict:
    """NMI, purity and usage in one record (labels < 0 are left out of NMI and purity)."""
    gold, pred = _check_pair(labels, assignments)
    known = gold >= 0
    out = {"usage": cluster_usage(pred, num_clusters), "scored_documents": int(known.sum())}
    if known.any():
        out["nmi"] = nmi(gold[known], pred[known])
        out["purity"] = purity(gold[known], pred[known])
    return out


@torch.no_grad()
def cluster_documents(model, docs: BagOfWords, top_n: int = 10, batch_size: int = 4096) -> dict:
    """Assign every document to its MAP cluster and describe the clusters.

    ``model`` is a discrete-latent model with ``log_joint(batch)`` (B, K) (M1), ``docs`` a
    :class:`BagOfWords` over the model's vocabulary. Returns a JSON-ready dict: per-document
    ``assignments`` (and ``ids``), cluster ``usage``, ``top_words`` per cluster (ranked
    against the corpus unigram), the exact log-likelihood and perplexity, and ``nmi`` /
    ``purity`` (with the label names) when ``docs`` has gold labels.
    """
    num_clusters = int(model.prior().logits.numel())
    was_training = model.training
    model.eval()
    assignments, log_px = [], []
    for batch in docs.batches(batch_size, dtype=model.word_logits.dtype):
        joint = model.log_joint(batch.to(model.word_logits.device))  # (B, K) on the model's device
        assignments.append(joint.argmax(-1).cpu())
        log_px.append(torch.logsumexp(joint, -1).cpu())
    model.train(was_training)
    assign = torch.cat(assignments).numpy()
    total = float(torch.cat(log_px).double().sum())
    num_tokens = docs.num_tokens
    background = torch.from_numpy(np.asarray(docs.counts.sum(axis=0)).ravel()).double()
    background = background / background.sum().clamp_min(1.0)
    out: dict = {
        "num_documents": len(docs),
        "num_clusters": num_clusters,
        "ids": list(docs.ids),
        "assignments": assign.tolist(),
        "usage": cluster_usage(assign, num_clusters),
        "top_words": top_words(model.log_word_probs(), docs.vocab, top_n, background=background),
        "log_likelihood": total,
        "tokens": num_tokens,
        "perplexity": _perplexity(total, num_tokens),
    }
    if docs.labels is not None:
        scores = score_assignments(docs.labels, assign, num_clusters)
        out.update({k: v for k, v in scores.items() if k != "usage"})
        out["label_names"] = docs.label_names
    return out
