"""M5/M6 hidden Markov models: exact marginals, EM monotonicity, gradient training."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from latentlm.data.batching import TextDataset
from latentlm.data.vocab import Vocab
from latentlm.inference.em import EMLearner, GEMLearner
from latentlm.inference.exact import ExactMarginal
from latentlm.models.hmm import HMM
from latentlm.models.neural_hmm import NeuralHMM
from latentlm.system import System

SENTENCES = [
    "the dog runs".split(), "a cat sleeps".split(), "the cat runs fast".split(),
    "a dog sleeps".split(), "dogs run".split(), "the big dog runs".split(), "cats sleep".split(),
]


def dataset():
    vocab = Vocab.build(SENTENCES)
    return TextDataset(SENTENCES, vocab), vocab


def brute_log_marginal(model, words):
    """sum over all K^n state paths of p(words, </s>, z), from the model's own tables."""
    log_init, log_trans, log_emit = (x.double() for x in model.log_probs())
    K = model.num_states
    n = len(words)
    total = []
    for path in itertools.product(range(K), repeat=n):
        s = log_init[path[0]] + log_trans[path[-1], K]
        s = s + sum(log_emit[path[t], words[t]] for t in range(n))
        s = s + sum(log_trans[path[t - 1], path[t]] for t in range(1, n))
        total.append(s)
    return torch.logsumexp(torch.stack(total), 0)


@pytest.mark.parametrize("cls", ["hmm", "neural", "neural_char"])
def test_log_marginal_matches_enumeration_and_is_a_distribution(cls):
    data, vocab = dataset()
    K = 3
    if cls == "hmm":
        model = HMM(len(vocab), K, seed=0).double()
    else:
        torch.manual_seed(0)
        model = NeuralHMM(len(vocab), K, dim=16, char_cnn=cls == "neural_char", words=vocab.itos).double()
    batch = data.make_batch(list(range(len(data))))
    got = model.log_marginal(batch)
    for b, i in enumerate(batch.index.tolist()):
        ids = data.examples[i][1:-1].tolist()
        torch.testing.assert_close(got[b], brute_log_marginal(model, ids))
    # probabilities of all sentences of length <= 2 over a 2-word sub-vocabulary plus the
    # remaining mass: check instead that emissions and transitions are normalized
    li, lt, le = model.log_probs()
    torch.testing.assert_close(li.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(lt.exp().sum(-1), torch.ones(K, dtype=torch.float64))
    torch.testing.assert_close(le.exp().sum(-1), torch.ones(K, dtype=torch.float64))
    assert (le[:, [vocab.pad_id, vocab.bos_id, vocab.eos_id]] == -torch.inf).all()


def test_sentence_probabilities_sum_to_one():
    """Over a 2-word vocabulary, sum_n sum_{x in V^n} p(x) = 1 (lengths up to 12 cover ~all mass)."""
    vocab = Vocab(["<pad>", "<s>", "</s>", "<unk>", "a"])
    model = HMM(len(vocab), 2, seed=1).double()
    with torch.no_grad():
        model.trans_logits[:, -1] += 2.0  # stop often, so short sentences carry the mass
    total = 0.0
    for n in range(0, 13):
        sents = [list(p) for p in itertools.product(["<unk>", "a"], repeat=n)]
        data = TextDataset(sents, vocab)
        batch = data.make_batch(list(range(len(data))))
        total += float(model.log_marginal(batch).detach().exp().sum())
    assert total == pytest.approx(1.0, abs=1e-3)


def run_learner(cls, model, batches, epochs, optimizer=None, **options):
    """EM epochs over fixed batches as the training loop runs them; log p(data) before each M-step."""
    learner = cls(System(model, None, ExactMarginal()), optimizer, {"init": "model", **options}, clip=5.0)
    learner.start(None, 0)
    history = []
    for epoch in range(epochs):
        for b in batches:
            learner.step(b, 0)
        history.append(-learner.end_epoch(epoch)["nll"] * len(SENTENCES))
    return history


def test_em_never_decreases_log_likelihood_and_counts_are_expected_counts():
    data, vocab = dataset()
    model = HMM(len(vocab), 4, seed=3).double()
    batches = list(data.batches(3))
    counts = [model.expected_counts(b).counts for b in batches]
    ci, ct, ce = (sum(c[k] for c in counts) for k in ("init", "trans", "emit"))
    n = len(SENTENCES)
    torch.testing.assert_close(ci.sum(), torch.tensor(float(n), dtype=torch.float64))
    torch.testing.assert_close(ce.sum(), torch.tensor(float(sum(map(len, SENTENCES))), dtype=torch.float64))
    torch.testing.assert_close(ct[:, -1].sum(), torch.tensor(float(n), dtype=torch.float64))  # one STOP each
    ll = run_learner(EMLearner, model, batches, 30)
    assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:])), ll
    assert ll[-1] > ll[0] + 1.0


def test_em_with_smoothing_increases_the_map_objective():
    data, vocab = dataset()
    model = HMM(len(vocab), 3, seed=4).double()
    batches = list(data.batches(4))
    alpha = 0.5

    def objective():
        li, lt, le = model.log_probs()
        prior = alpha * (li.sum() + lt.sum() + le[:, ~model.non_emitted].sum())
        return float((sum(model.log_marginal(b).sum() for b in batches) + prior).detach())

    values = []
    for _ in range(10):
        values.append(objective())
        model.em_step(batches, smoothing=alpha)
    values.append(objective())
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:])), values


def test_gradient_training_matches_hmm_and_tags():
    data, vocab = dataset()
    torch.manual_seed(0)
    for model in (HMM(len(vocab), 3, seed=0), NeuralHMM(len(vocab), 3, dim=16)):
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        batch = data.make_batch(list(range(len(data))))
        first = None
        for _ in range(40):
            loss = -model.log_marginal(batch).mean()
            first = first if first is not None else float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(loss.detach()) < first - 0.5
        tags = model.tag(batch)
        n = batch.lengths - 1
        assert tags.shape == (len(data), int(n.max()))
        for b in range(len(data)):
            assert (tags[b, : n[b]] >= 0).all() and (tags[b, n[b]:] == -1).all()
        # the Viterbi path is a posterior mode: its log_prob is the largest of some samples
        post = model.posterior(batch)
        samples = post.sample((20,))
        assert (post.log_prob(tags) >= post.log_prob(samples).max(0).values - 1e-5).all()


def test_log_likelihood_of_paths_and_generation():
    data, vocab = dataset()
    model = HMM(len(vocab), 3, seed=5).double()
    batch = data.make_batch([0, 1, 2])
    post = model.posterior(batch)
    z = post.sample((4,))  # (4, 3, N)
    li, lt, le = model.log_probs()
    n = batch.lengths - 1
    # log p(z) of the state chain, STOP included, computed by hand
    log_pz = torch.zeros(4, 3, dtype=torch.float64)
    for s_ in range(4):
        for b in range(3):
            path = z[s_, b, : n[b]].tolist()
            v = li[path[0]] + lt[path[-1], -1] + sum(lt[path[t - 1], path[t]] for t in range(1, len(path)))
            log_pz[s_, b] = v
    lhs = model.log_likelihood(batch, z) + log_pz  # log p(x, z)
    rhs = post.log_prob(z) + model.log_marginal(batch)  # log p(z | x) + log p(x)
    torch.testing.assert_close(lhs.detach(), rhs.detach())
    out = model.generate(None, 5, max_len=8)
    assert out.shape == (5, 10) and (out[:, 0] == vocab.bos_id).all()
    assert ((out == vocab.eos_id).sum(1) == 1).all()


def test_empty_sentence_is_stop_at_once():
    vocab = Vocab(["<pad>", "<s>", "</s>", "<unk>", "a"])
    model = HMM(len(vocab), 2, seed=0).double()
    data = TextDataset([[], ["a"]], vocab)
    lp = model.log_marginal(data.make_batch([0, 1]))
    li = model.log_probs()[0]
    assert float(lp[0].detach()) == pytest.approx(float(li[-1].detach()))
    assert math.isfinite(float(lp[1].detach()))


def test_neural_hmm_generalized_em_m_step_gradient_is_the_marginal_gradient_and_em_climbs():
    """Fisher's identity: at the parameters the expected counts came from, the gradient of the
    expected complete log-likelihood equals the gradient of log p(x); so small M-steps climb."""
    data, vocab = dataset()
    torch.manual_seed(0)
    model = NeuralHMM(len(vocab), 3, dim=8, char_cnn=True, words=vocab.itos,
                      char_options={"filters": 4, "widths": (1, 2), "char_dim": 4}).double()
    batches = list(data.batches(3))
    per_batch = [model.expected_counts(b).counts for b in batches]
    counts = {k: sum(c[k] for c in per_batch) for k in per_batch[0]}
    q_grads = torch.autograd.grad(model.expected_complete_log_likelihood(counts), list(model.parameters()))
    log_px = sum(model.log_marginal(b).sum() for b in batches)
    p_grads = torch.autograd.grad(log_px, list(model.parameters()))
    for a, b in zip(q_grads, p_grads):
        torch.testing.assert_close(a, b)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ll = run_learner(GEMLearner, model, batches, 15, optimizer, m_steps=3)
    assert all(b >= a - 1e-6 for a, b in zip(ll, ll[1:])), ll
    assert ll[-1] > ll[0] + 1.0
