"""M1, the naive-Bayes mixture: exact marginal vs brute force, sparse vs dense, gradients."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlm.data.documents import BagOfWords, BowBatch, to_torch_csr
from latentlm.data.vocab import SPECIALS, Vocab
from latentlm.models.nb_mixture import NaiveBayesMixture


def _vocab(num_words: int) -> Vocab:
    return Vocab(list(SPECIALS) + [f"w{i}" for i in range(num_words)])


def _batch_from_token_lists(token_ids: list[list[int]], vocab_size: int, sparse: bool) -> BowBatch:
    rows = [np.bincount(np.asarray(t, dtype=np.int64), minlength=vocab_size) for t in token_ids]
    mat = sp.csr_matrix(np.stack(rows).astype(np.float64))
    counts = to_torch_csr(mat, torch.float64) if sparse else torch.from_numpy(mat.toarray())
    lengths = torch.tensor([len(t) for t in token_ids])
    return BowBatch(counts, lengths, torch.arange(len(token_ids)))


def _brute_force_log_marginal(model: NaiveBayesMixture, token_ids: list[list[int]]) -> list[float]:
    """Sum over k of mu_k * prod over tokens pi_{k, x_t}, token by token, in plain Python."""
    mu = model.log_mixture().exp().tolist()
    pi = model.log_word_probs().exp().tolist()
    out = []
    for tokens in token_ids:
        total = 0.0
        for k in range(model.num_clusters):
            p = mu[k]
            for t in tokens:
                p *= pi[k][t]
            total += p
        out.append(math.log(total))
    return out


@settings(max_examples=25, deadline=None)
@given(
    num_clusters=st.integers(1, 4),
    vocab_size=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    lengths=st.lists(st.integers(0, 7), min_size=1, max_size=5),
    sparse=st.booleans(),
)
def test_exact_marginal_equals_brute_force_sum_over_clusters(num_clusters, vocab_size, seed, lengths, sparse):
    torch.manual_seed(seed)
    model = NaiveBayesMixture(vocab_size, num_clusters, init_scale=1.0).double()
    with torch.no_grad():
        model.mixture_logits.normal_()
    rng = np.random.default_rng(seed)
    token_ids = [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]
    batch = _batch_from_token_lists(token_ids, vocab_size, sparse)
    got = model.log_marginal(batch)
    assert got.shape == (len(lengths),)
    expected = torch.tensor(_brute_force_log_marginal(model, token_ids), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # posterior is Bayes' rule on the same quantities
    post = model.posterior(batch).probs  # (B, K)
    torch.testing.assert_close(post.sum(-1), torch.ones(len(lengths), dtype=torch.float64))


def test_sparse_and_dense_counts_agree_in_value_and_gradient():
    torch.manual_seed(0)
    model = NaiveBayesMixture(30, 5, init_scale=1.0).double()
    rng = np.random.default_rng(0)
    token_ids = [rng.integers(0, 30, size=n).tolist() for n in (3, 0, 17, 9)]
    values, grads = [], []
    for sparse in (True, False):
        model.zero_grad()
        lp = model.log_marginal(_batch_from_token_lists(token_ids, 30, sparse))
        (-lp.mean()).backward()
        values.append(lp.detach())
        grads.append((model.word_logits.grad.clone(), model.mixture_logits.grad.clone()))
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_exact_marginal_gradient_matches_finite_difference():
    torch.manual_seed(1)
    model = NaiveBayesMixture(4, 3, init_scale=1.0).double()
    batch = _batch_from_token_lists([[0, 1, 1], [2, 3], [3, 3, 3, 0]], 4, sparse=True)
    model.log_marginal(batch).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        for k, v in [(0, 1), (2, 3)]:
            model.word_logits[k, v] += eps
            up = model.log_marginal(batch).sum()
            model.word_logits[k, v] -= 2 * eps
            down = model.log_marginal(batch).sum()
            model.word_logits[k, v] += eps
            assert abs(float((up - down) / (2 * eps)) - float(model.word_logits.grad[k, v])) < 1e-6


def test_zero_probability_words_give_minus_inf_not_nan_on_dense_counts():
    model = NaiveBayesMixture(3, 2).double()
    log_pi = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64))
    model.set_log_probs(torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64)), log_pi)
    for sparse in (True, False):
        batch = _batch_from_token_lists([[0, 1], [2, 2]], 3, sparse)
        joint = model.log_joint(batch)  # (2, 2)
        assert not torch.isnan(joint).any()
        assert joint[1, 0] == -math.inf and torch.isfinite(joint[0]).all()
        assert torch.isfinite(model.log_marginal(batch)).all()


def test_log_likelihood_accepts_ids_and_relaxed_vectors():
    torch.manual_seed(2)
    model = NaiveBayesMixture(6, 3, init_scale=1.0)
    batch = _batch_from_token_lists([[0, 1, 5], [2, 2], [4]], 6, sparse=True)
    batch.counts = batch.counts.to(torch.float32)
    per_cluster = model.cluster_log_likelihood(batch)  # (B, K)
    z = torch.tensor([[0, 1, 2], [2, 2, 0]])           # (S=2, B=3)
    got = model.log_likelihood(batch, z)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got[1, 0], per_cluster[0, 2])
    one_hot = torch.nn.functional.one_hot(z, 3).float()  # (S, B, K)
    torch.testing.assert_close(model.log_likelihood(batch, one_hot), got)
    torch.testing.assert_close(model.log_likelihood_all(batch), per_cluster.t())  # (K, B)
    import pytest

    with pytest.raises(ValueError, match="cluster ids"):
        model.log_likelihood(batch, torch.zeros(2, 3, 5))


def test_exact_marginal_objective_trains_m1_by_gradient():
    from latentlm.inference.exact import ExactMarginal

    torch.manual_seed(3)
    truth = NaiveBayesMixture(20, 2, init_scale=3.0)
    _, counts = truth.sample(torch.full((200,), 30), generator=torch.Generator().manual_seed(0))
    bow = BagOfWords(sp.csr_matrix(counts.numpy()), _vocab(16))
    model = NaiveBayesMixture(20, 2)
    objective = ExactMarginal()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    batch = bow.batch()
    first = None
    for _ in range(60):
        out = objective(model, None, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.loss.detach())
    assert float(out.loss.detach()) < first - 5.0
    assert out.tokens.sum() == 200 * 30


def test_sample_returns_documents_of_the_requested_lengths():
    model = NaiveBayesMixture(10, 3)
    lengths = torch.tensor([0, 5, 12, 1])
    z, counts = model.sample(lengths, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4,) and counts.shape == (4, 10)
    torch.testing.assert_close(counts.sum(-1).long(), lengths)
    assert model.generate(None, num=3, max_len=7).shape == (3, 7)


def test_set_log_probs_rejects_wrong_shapes():
    import pytest

    model = NaiveBayesMixture(10, 3)
    with pytest.raises(ValueError, match="shapes"):
        model.set_log_probs(torch.zeros(3), torch.zeros(3, 9))
    with pytest.raises(ValueError, match="do not match"):
        model.log_marginal(BowBatch(torch.ones(2, 9), torch.tensor([9, 9]), torch.arange(2)))
