"""M10: a neural topic model (the tutorial's case study; Miao et al. 2017's GSM).

z0 ~ N(0, I) (D dims); theta = softmax(W z0 + c) are K topic proportions; each topic is
a word distribution beta_k = softmax(B_k); every token ~ Cat(theta . beta). So
log p(x | z0) = sum_w n_w(x) log sum_k theta_k beta_kw. Reads document counts
(``BowBatch``) or token batches; its default posterior is ``gaussian_bow``.

On a ``BowBatch`` the likelihood is evaluated only at the words each document contains
(no (samples, docs, topics, V) tensor), so 20 Newsgroups at V = 10k trains on a CPU.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.distributions import Independent, Normal

from latentlm.data.documents import BagOfWords, BowBatch
from latentlm.models.base import InitializedFromData, LatentVariableModel
from latentlm.nn.bow import bag_of_words


def nonzero_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the nonzero entries of a (B, V) sparse-CSR or dense count matrix."""
    if counts.layout == torch.sparse_csr:
        crow = counts.crow_indices()
        rows = torch.repeat_interleave(torch.arange(counts.size(0), device=crow.device), crow.diff())
        return rows, counts.col_indices(), counts.values()
    rows, cols = counts.nonzero(as_tuple=True)
    return rows, cols, counts[rows, cols]


class NeuralTopicModel(LatentVariableModel, InitializedFromData):
    latent = "continuous"
    default_posterior = "gaussian_bow"
    #: (samples x nonzero entries x topics) floats the observed-words likelihood builds at once.
    chunk_elements = 20_000_000

    def __init__(self, vocab_size: int, num_topics: int = 50, latent_dim: int = 50, init_docs: int = 0,
                 init_per_document: bool = False):
        super().__init__()
        self.vocab_size, self.latent_dim, self.num_topics = vocab_size, latent_dim, num_topics
        # > 0: a fresh run starts each topic from this many random training documents (see
        # init_topics_from_documents); 0: the near-uniform random init
        self.init_docs, self.init_per_document = init_docs, init_per_document
        self.to_theta = nn.Linear(latent_dim, num_topics)
        self.topic_logits = nn.Parameter(torch.randn(num_topics, vocab_size) * 0.01)  # (K, V)
        self.register_buffer("_zeros", torch.zeros(latent_dim), persistent=False)

    def prior(self) -> Independent:
        return Independent(Normal(self._zeros, torch.ones_like(self._zeros)), 1)

    def topics(self) -> torch.Tensor:
        """log beta, (K, V)."""
        return torch.log_softmax(self.topic_logits.float(), -1)

    def word_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """log sum_k theta_k(z) beta_kw, (..., V), in log space (logsumexp over topics)."""
        log_theta = torch.log_softmax(self.to_theta(z).float(), -1)  # (..., K)
        return torch.logsumexp(log_theta[..., :, None] + self.topics(), dim=-2)  # (..., V)

    def log_likelihood(self, batch, z: torch.Tensor) -> torch.Tensor:
        """z (S, B, D) -> (S, B). A document ``BowBatch`` (sparse or dense counts) is scored at
        its observed words only (:meth:`observed_log_likelihood`); a token batch densely."""
        if isinstance(batch, BowBatch):
            return self.observed_log_likelihood(batch.counts, z)
        counts = bag_of_words(batch, self.vocab_size)  # (B, V)
        return (self.word_log_probs(z) * counts).sum(-1)

    def observed_log_likelihood(self, counts: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sum_w n_w log sum_k theta_k(z) beta_kw over each document's nonzero counts only.

        counts (B, V) sparse CSR or dense, z (S, B, D) -> (S, B); the same value as the dense
        ``(word_log_probs(z) * counts).sum(-1)`` without its (S, B, K, V) tensor. log p(w | z) is
        m_theta + m_w + log sum_k exp(log theta_k - m_theta) exp(log beta_kw - m_w), with
        m_theta = max_k log theta_k and m_w = max_k log beta_kw, so both factors are <= 1 and
        the largest of each is 1. Samples run in chunks of at most ``chunk_elements`` floats.
        """
        rows, cols, vals = nonzero_counts(counts)
        log_theta = torch.log_softmax(self.to_theta(z).float(), -1)  # (S, B, K)
        m_theta = log_theta.max(-1, keepdim=True).values  # (S, B, 1)
        theta = (log_theta - m_theta).exp()  # (S, B, K), max 1
        log_beta = self.topics()[:, cols]  # (K, nnz)
        m_word = log_beta.max(0).values  # (nnz,)
        beta = (log_beta - m_word).exp()  # (K, nnz), max 1 per column
        S, B = z.shape[0], z.shape[1]
        step = max(1, self.chunk_elements // max(1, rows.numel() * self.num_topics))
        out = []
        for start in range(0, S, step):  # chunks of samples; no loop over tokens or documents
            mix = (theta[start : start + step, rows, :] * beta.t()).sum(-1)  # (s, nnz)
            log_p = mix.log() + m_theta[start : start + step, rows, 0] + m_word  # (s, nnz)
            out.append(torch.zeros(log_p.size(0), B, dtype=log_p.dtype, device=log_p.device)
                       .index_add_(1, rows, log_p * vals.to(log_p.dtype)))
        return torch.cat(out)  # (S, B)

    def initialize_from_data(self, dataset, seed: int) -> None:
        """With ``init_docs`` > 0, topics from random documents of ``dataset`` (a ``BagOfWords``)."""
        if self.init_docs > 0:
            if not isinstance(dataset, BagOfWords):
                raise ValueError("topic_model init_docs needs a documents dataset (data.format: documents)")
            self.init_topics_from_documents(dataset.counts, self.init_docs, seed, per_document=self.init_per_document)

    @torch.no_grad()
    def init_topics_from_documents(self, counts: sp.spmatrix, docs_per_topic: int = 20, seed: int = 0,
                                   per_document: bool = False) -> None:
        """Topic k's word distribution := 1/2 (the words of ``docs_per_topic`` random documents of
        ``counts``, an (N, V) scipy matrix of training counts) + 1/2 (the words of all of them).

        Distinct, data-like topics, so that z matters from the first step: with the default
        near-identical initial topics log p(x | z) barely depends on z and the posterior can
        collapse to the prior before the topics separate (20 Newsgroups, K = 50: test PPL
        ~4,400, barely below the unigram's 4,650). ``per_document=False`` pools the token counts
        (one huge document then puts its words high in every initial topic); ``per_document=True``
        averages per-document word distributions instead. Documents are drawn with replacement.
        """
        counts = sp.csr_matrix(counts)
        rng = np.random.default_rng(seed)
        if per_document:  # rows become word distributions; the background is their mean, smoothed
            lengths = np.asarray(counts.sum(1), dtype=np.float64).ravel()
            counts = sp.csr_matrix(sp.diags(1.0 / np.maximum(lengths, 1.0)) @ counts)  # rows sum to 1
            unigram = np.asarray(counts.mean(0), dtype=np.float64).ravel() + 1e-6
        else:  # the pooled token counts, smoothed
            unigram = np.asarray(counts.sum(0), dtype=np.float64).ravel() + 1e-3
        unigram /= unigram.sum()
        picks = rng.choice(counts.shape[0], size=(self.num_topics, docs_per_topic), replace=True)
        topic_counts = np.stack([np.asarray(counts[row].sum(0), dtype=np.float64).ravel() for row in picks])  # (K, V)
        probs = 0.5 * topic_counts / topic_counts.sum(1, keepdims=True) + 0.5 * unigram
        self.topic_logits.copy_(torch.from_numpy(np.log(probs)))

    @torch.no_grad()
    def top_words(self, k: int = 10) -> torch.Tensor:
        """(K, k) ids of each topic's most probable words."""
        return self.topic_logits.topk(k, dim=-1).indices


def npmi_coherence(top_words: torch.Tensor, doc_word) -> torch.Tensor:
    """Topic coherence: mean NPMI over pairs of each topic's top words (Lau et al. 2014),
    from document co-occurrence. ``top_words`` (K, n) ids; ``doc_word`` (N, V) counts or
    0/1 presence of the reference (training) documents, a torch tensor or a scipy sparse
    matrix (then only the columns the top words use are made dense). Returns (K,) in
    [-1, 1]; a pair never seen together scores -1.
    """
    if sp.issparse(doc_word):
        ids = top_words.cpu().numpy()
        cols = np.unique(ids)
        sub = sp.csr_matrix(doc_word)[:, cols]
        doc_word = torch.from_numpy((sub > 0).toarray().astype(np.float32))  # (N, |cols|)
        top_words = torch.from_numpy(np.searchsorted(cols, ids))
    present = (doc_word > 0).float()  # (N, V)
    n_docs = present.size(0)
    scores = []
    for words in top_words:
        cols = present[:, words]  # (N, n)
        p_i = cols.mean(0)  # (n,)
        p_ij = (cols.t() @ cols) / n_docs  # (n, n)
        pmi = torch.log(p_ij / (p_i[:, None] * p_i[None, :]))
        npmi = torch.where(p_ij > 0, pmi / -torch.log(p_ij), torch.full_like(p_ij, -1.0))
        iu = torch.triu_indices(len(words), len(words), offset=1)
        scores.append(npmi[iu[0], iu[1]].mean())
    return torch.stack(scores) if scores else torch.zeros(0)
