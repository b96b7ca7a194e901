"""M2 mixture of RNN LMs and the discrete-latent estimators, checked against exact answers."""

import math

import pytest
import torch

from latentlm.data import TextDataset, Vocab
from latentlm.inference import ELBO, VIMCO
from latentlm.models import MixtureOfRNNLMs
from latentlm.models.base import FiniteLatentModel

SENTS = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"], ["c", "c", "b"]]


def _setup(mode, K=3):
    torch.manual_seed(0)
    vocab = Vocab.build(SENTS)
    model = MixtureOfRNNLMs(len(vocab), num_components=K, embed_dim=6, hidden_dim=7, component_dim=4, mode=mode)
    with torch.no_grad():
        model.prior_logits.copy_(torch.randn(K))
    batch = TextDataset(SENTS, vocab).make_batch(range(len(SENTS)))
    return model.eval(), batch, vocab


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_exact_marginal_equals_brute_force_sum(mode):
    model, batch, _ = _setup(mode)
    K = model.num_components
    with torch.no_grad():
        exact = model.log_marginal(batch)
        brute = torch.zeros(batch.size)
        for b in range(batch.size):
            one = TextDataset([SENTS[b]], Vocab(list(_setup(mode)[2].itos))).make_batch([0])
            total = sum(math.exp(float(model.prior().log_prob(torch.tensor(k)))
                                 + float(model.log_likelihood(one, torch.tensor([[k]]))[0, 0])) for k in range(K))
            brute[b] = math.log(total)
    torch.testing.assert_close(exact, brute, rtol=1e-5, atol=1e-5)


def test_separate_components_match_an_lstm_run_one_at_a_time():
    model, batch, _ = _setup("separate")
    lms = model.components
    with torch.no_grad():
        all_ll = model.log_likelihood_all(batch)  # (K, B)
        k, b = 1, 2
        ids = batch.tokens[b, : int(batch.lengths[b]) + 1]
        h = c = torch.zeros(lms.hidden_dim)
        total = 0.0
        for prev, nxt in zip(ids[:-1], ids[1:]):
            gates = lms.embed.weight[prev] @ lms.w_ih[k] + h @ lms.w_hh[k] + lms.bias[k, 0]
            i, f, g, o = gates.chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            total += float(torch.log_softmax(h @ lms.out_w[k] + lms.out_b[k, 0], -1)[nxt])
    assert float(all_ll[k, b]) == pytest.approx(total, rel=1e-5)


class TableModel(FiniteLatentModel):
    """A discrete-latent model whose log p(x_b | z = k) is a fixed table (K, B): cheap enough
    to average an estimator over thousands of draws. A relaxed z mixes the rows."""

    def __init__(self, table, prior_logits):
        super().__init__()
        self.table, self.prior_logits = table, prior_logits

    def prior(self):
        return torch.distributions.Categorical(logits=self.prior_logits)

    def log_likelihood_all(self, batch):
        return self.table

    def log_likelihood(self, batch, z):
        if z.dim() == 2:
            return self.table.gather(0, z)
        return torch.einsum("sbk,kb->sb", z, self.table)

    def log_marginal(self, batch):
        return torch.logsumexp(self.prior().logits[:, None] + self.table, 0)


class TablePosterior(torch.nn.Module):
    def __init__(self, B, K):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(B, K))

    def forward(self, batch):
        return torch.distributions.Categorical(logits=self.logits)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(3)
    B, K = 4, 3
    model = TableModel(-5 * torch.rand(K, B) - 1, torch.randn(K))
    posterior = TablePosterior(B, K)
    batch = TextDataset(SENTS[:B], Vocab.build(SENTS)).make_batch(range(B))
    out = ELBO(estimator="enumerate")(model, posterior, batch)
    exact = torch.autograd.grad(out.bound.mean(), posterior.logits)[0]
    return model, posterior, batch, exact


def _estimator_grads(estimator, toy, draws, samples=1):
    model, posterior, batch, _ = toy
    objective = ELBO(estimator=estimator, samples=samples, vocab_size=8)
    grads = []
    for _ in range(draws):
        out = objective(model, posterior, batch)
        # -loss = surrogate ELBO (beta = 1, no free bits): its gradient is the estimator
        grads.append(torch.autograd.grad(-out.loss, posterior.logits)[0])
    return torch.stack(grads)


@pytest.mark.parametrize("estimator, samples", [
    ("score_function", 1),
    ({"type": "score_function", "baseline": "leave_one_out"}, 4),
    ({"type": "score_function", "baseline": "moving_average"}, 1),
])
def test_score_function_estimators_are_unbiased(toy, estimator, samples):
    exact = toy[3]
    torch.manual_seed(0)
    grads = _estimator_grads(estimator, toy, draws=4000, samples=samples)
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert ((mean - exact).abs() <= 4.5 * sem + 1e-5).all(), (mean, exact, sem)


def test_baselines_reduce_variance(toy):
    torch.manual_seed(0)
    plain = _estimator_grads("score_function", toy, draws=1500, samples=4)
    loo = _estimator_grads({"type": "score_function", "baseline": "leave_one_out"}, toy, draws=1500, samples=4)
    avg = _estimator_grads({"type": "score_function", "baseline": "moving_average", "decay": 0.9}, toy,
                           draws=1500, samples=4)
    assert loo.var(0).sum() < 0.5 * plain.var(0).sum()
    assert avg[100:].var(0).sum() < 0.5 * plain.var(0).sum()


def test_gumbel_softmax_is_biased_at_tau_1_and_less_so_at_low_tau(toy):
    exact = toy[3]
    torch.manual_seed(0)
    bias = {}
    for tau in (1.0, 0.05):
        g = _estimator_grads({"type": "gumbel", "temperature": tau, "min_temperature": tau}, toy, draws=3000)
        mean, sem = g.mean(0), g.std(0) / math.sqrt(len(g))
        bias[tau] = float((mean - exact).norm())
        if tau == 1.0:
            assert ((mean - exact).abs() > 5 * sem).any(), "Gumbel-softmax at tau = 1 should be visibly biased"
    assert bias[0.05] < 0.5 * bias[1.0], bias


def test_straight_through_runs_and_uses_hard_samples(toy):
    model, posterior, batch, _ = toy
    out = ELBO(estimator="straight_through")(model, posterior, batch)
    # with one-hot forward values the reconstruction is one of the table's entries
    assert any(torch.isclose(out.reconstruction[0], model.table[k, 0]) for k in range(3))
    out.loss.backward()
    assert posterior.logits.grad is not None and posterior.logits.grad.abs().sum() > 0


def test_vimco_bound_is_between_elbo_and_log_marginal(toy):
    model, posterior, batch, _ = toy
    torch.manual_seed(0)
    with torch.no_grad():
        exact = model.log_marginal(batch)
        elbo = ELBO(estimator="enumerate")(model, posterior, batch).bound
        vimco = torch.stack([VIMCO(samples=8)(model, posterior, batch).bound for _ in range(500)]).mean(0)
    assert (elbo < vimco).all() and (vimco <= exact + 1e-4).all()


def test_vimco_gradient_is_unbiased_for_the_iwae_bound(toy):
    """For k = 2 the IWAE bound's expectation is a finite sum over pairs; compare gradients."""
    model, posterior, batch, _ = toy
    log_q = posterior(batch).logits.T                                       # (K, B)
    lw = model.prior().logits[:, None] + model.table - log_q
    pair = torch.logsumexp(torch.stack(torch.broadcast_tensors(lw[:, None], lw[None, :])), 0) - math.log(2)
    expected = (log_q[:, None] + log_q[None, :]).exp() * pair               # (K, K, B)
    exact = torch.autograd.grad(expected.sum((0, 1)).mean(), posterior.logits)[0]
    torch.manual_seed(0)
    grads = []
    for _ in range(4000):
        out = VIMCO(samples=2)(model, posterior, batch)
        grads.append(torch.autograd.grad(-out.loss, posterior.logits)[0])
    grads = torch.stack(grads)
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert ((mean - exact).abs() <= 4.5 * sem + 1e-5).all(), (mean, exact, sem)


def test_learned_baseline_trains_through_the_elbo_and_reads_any_batch(toy):
    model, posterior, batch, _ = toy
    objective = ELBO(estimator={"type": "score_function", "baseline": "learned"}, vocab_size=8)
    out = objective(model, posterior, batch)
    baseline = objective.estimator.network
    assert out.loss.requires_grad
    out.loss.backward()
    assert baseline.mlp[0].weight.grad is not None  # the squared-error fit reaches psi
    from latentlm.data.documents import BowBatch

    bow = BowBatch(counts=torch.ones(2, 8), lengths=torch.tensor([8, 8]), index=torch.arange(2))
    assert baseline(bow).shape == (2,)


def test_evaluation_of_a_mixture_with_q_reports_exact_nll_enumerated_elbo_kl_and_usage():
    """ELBO <= log p(x) with equality when q is the exact posterior; KL(q || p) >= 0."""
    from torch import nn

    from latentlm.evaluation import evaluate
    from latentlm.inference.posteriors import CategoricalLSTMPosterior
    from latentlm.system import System

    model, _, vocab = _setup("shared")
    data = TextDataset(SENTS, vocab)
    posterior = CategoricalLSTMPosterior(len(vocab), model.num_components, embed_dim=4, hidden_dim=4)
    result = evaluate(System(model, posterior, ELBO(estimator="enumerate")), data, batch_size=2)
    with torch.no_grad():
        exact_nll = -float(model.log_marginal(data.make_batch(range(len(SENTS)))).sum()) / len(SENTS)
    assert result["nll"] == pytest.approx(exact_nll, rel=1e-5)
    assert result["kl"] >= 0 and result["elbo"] <= -result["nll"] + 1e-5
    assert 1 <= result["q_components_used"] <= 3 and 1 <= result["components_used"] <= 3

    class ExactPosterior(nn.Module):  # q = p(z | x): the bound is tight
        def forward(self, batch):
            return torch.distributions.Categorical(probs=model.posterior_probs(batch))

    tight = evaluate(System(model, ExactPosterior(), ELBO(estimator="enumerate")), data, batch_size=2)
    assert tight["elbo"] == pytest.approx(-tight["nll"], abs=1e-4)
    assert tight["q_components_used"] == tight["components_used"]


@pytest.mark.parametrize("estimator", ["enumerate", {"type": "gumbel", "temperature": 0.5},
                                       {"type": "straight_through"}, {"type": "score_function", "baseline": "leave_one_out"}])
def test_discrete_estimators_train_under_bf16_autocast(estimator):
    from latentlm.inference.posteriors import CategoricalLSTMPosterior

    model, batch, vocab = _setup("shared")
    model.train()
    posterior = CategoricalLSTMPosterior(len(vocab), model.num_components, embed_dim=4, hidden_dim=4)
    samples = 4 if isinstance(estimator, dict) and estimator["type"] == "score_function" else 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ELBO(estimator=estimator, samples=samples)(model, posterior, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in posterior.parameters())
