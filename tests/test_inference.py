import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from latentlm.data import TextDataset, Vocab
from latentlm.inference import ELBO, IWAE, CyclicalSchedule, LinearSchedule, free_bits, kl_per_dimension
from latentlm.inference.posteriors import GaussianLSTMPosterior
from latentlm.models import SentenceVAE


def test_gaussian_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 0.5
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    closed = kl_per_dimension(q, p).sum(-1)
    by_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
    torch.testing.assert_close(closed, by_hand)
    torch.manual_seed(1)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(mc, closed, atol=0.02, rtol=0.01)


def test_kl_schedules():
    lin = LinearSchedule(start=0.1, end=1.0, steps=100)
    assert lin(0) == pytest.approx(0.1) and lin(50) == pytest.approx(0.55) and lin(500) == 1.0
    cyc = CyclicalSchedule(period=100, cycles=2, ratio=0.5)
    assert [cyc(s) for s in (0, 25, 50, 99, 100, 125, 250)] == pytest.approx([0, 0.5, 1, 1, 0, 0.5, 1])


def test_free_bits_gradient_is_zero_below_the_floor():
    kl = torch.tensor([[0.1, 2.0], [0.3, 3.0]], requires_grad=True)
    free_bits(kl, floor=0.5).backward()
    # dim 0 has batch-mean KL 0.2 < 0.5: no gradient; dim 1 has 2.5 > 0.5: gradient 1/B.
    torch.testing.assert_close(kl.grad, torch.tensor([[0.0, 0.5], [0.0, 0.5]]))
    total = torch.tensor([[0.1, 0.2]], requires_grad=True)
    free_bits(total, floor=1.0, per_dimension=False).backward()
    assert (total.grad == 0).all()


@pytest.fixture(scope="module")
def one_dim_vae():
    """A sentence VAE with a 1-D latent, so log p(x) is computable by quadrature."""
    torch.manual_seed(0)
    sents = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"]]
    vocab = Vocab.build(sents)
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=1).eval()
    with torch.no_grad():  # make the decoder depend strongly on z
        model.decoder.z_to_state.weight.mul_(8)
        model.decoder.lstm.weight_ih_l0[:, -1].mul_(8)
    posterior = GaussianLSTMPosterior(len(vocab), 1, embed_dim=8, hidden_dim=8).eval()
    with torch.no_grad():  # an off-centre, narrow q: a loose ELBO that IWAE visibly tightens
        posterior.to_params.bias.copy_(torch.tensor([1.5, -1.0]))
    batch = TextDataset(sents, vocab).make_batch(range(len(sents)))
    grid = torch.linspace(-10, 10, 4001)
    with torch.no_grad():
        log_lik = model.log_likelihood(batch, grid[:, None, None].expand(-1, batch.size, 1))  # (G, B)
        log_prior = Normal(0.0, 1.0).log_prob(grid)[:, None]
        exact = torch.logsumexp(log_lik + log_prior, 0) + math.log(float(grid[1] - grid[0]))
    return model, posterior, batch, exact


def _mean_bound(objective, model, posterior, batch, draws):
    torch.manual_seed(0)
    with torch.no_grad():
        return torch.stack([objective(model, posterior, batch).bound for _ in range(draws)]).mean(0)


def test_elbo_le_iwae_le_exact(one_dim_vae):
    model, posterior, batch, exact = one_dim_vae
    elbo = _mean_bound(ELBO(samples=1), model, posterior, batch, 2000)
    iwae = {k: _mean_bound(IWAE(samples=k), model, posterior, batch, 400) for k in (2, 10, 50)}
    assert (elbo < iwae[2]).all()
    assert (iwae[2] < iwae[10]).all() and (iwae[10] < iwae[50]).all()
    assert (iwae[50] <= exact + 1e-3).all()
    # the gap is real: q is an untrained encoder, far from the posterior.
    assert (exact - elbo > 0.05).all()


def test_importance_sampling_converges_to_exact(one_dim_vae):
    model, _, batch, exact = one_dim_vae
    from latentlm.evaluation import importance_sampled_log_marginal

    posterior = GaussianLSTMPosterior(model.vocab_size, 1, embed_dim=8, hidden_dim=8).eval()
    with torch.no_grad():  # q = N(0, 1) = the prior, a proposal with full support
        posterior.to_params.weight.zero_()
        posterior.to_params.bias.zero_()

    torch.manual_seed(0)
    est = importance_sampled_log_marginal(model, posterior, batch, samples=20_000, chunk=5000)
    torch.testing.assert_close(est, exact, atol=0.05, rtol=0)


def test_elbo_reports_the_true_bound_under_annealing(one_dim_vae):
    model, posterior, batch, _ = one_dim_vae
    objective = ELBO(kl_schedule={"type": "linear", "start": 0.0, "steps": 10})
    torch.manual_seed(0)
    out = objective(model, posterior, batch, step=0)
    torch.testing.assert_close(out.bound, out.reconstruction - out.kl)
    torch.testing.assert_close(out.loss, -out.reconstruction.mean())  # beta = 0 at step 0
    assert (out.kl > 0).all()


def test_reparameterized_gradient_matches_finite_differences(one_dim_vae):
    """d/dmu of E_q[log p(x|z)] by the pathwise estimator vs finite differences with common noise."""
    model, _, batch, _ = one_dim_vae
    eps = torch.randn(4000, 1, 1)
    mu = torch.zeros(batch.size, 1, requires_grad=True)

    def rec(m):
        return model.log_likelihood(batch, m + 0.3 * eps.expand(-1, batch.size, 1)).mean(0).sum()

    (grad,) = torch.autograd.grad(rec(mu), mu)
    h = 1e-2
    with torch.no_grad():
        for b in range(batch.size):
            up, down = mu.detach().clone(), mu.detach().clone()
            up[b] += h
            down[b] -= h
            fd = (rec(up) - rec(down)) / (2 * h)
            assert float(grad[b]) == pytest.approx(float(fd), rel=2e-2, abs=1e-3)
