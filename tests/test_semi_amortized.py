"""L8: SA-VAE refinement — it improves the per-example ELBO, and its gradient is right."""

import pytest
import torch

from latentlm.data import TextDataset, Vocab
from latentlm.inference.posteriors import GaussianLSTMPosterior
from latentlm.inference.semi_amortized import SemiAmortizedELBO, gaussian_elbo, refine_gaussian
from latentlm.models import SentenceVAE
from latentlm.models.base import LatentVariableModel

SENTS = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"], ["c", "c", "b", "a", "c"]]


def _tiny(latent_dim, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    vocab = Vocab.build(SENTS)
    batch = TextDataset(SENTS, vocab).make_batch(range(len(SENTS)))
    model = SentenceVAE(len(vocab), embed_dim=6, hidden_dim=6, latent_dim=latent_dim).to(dtype).eval()
    with torch.no_grad():  # make the decoder depend strongly on z
        model.decoder.z_to_state.weight.mul_(6)
        model.decoder.lstm.weight_ih_l0[:, -latent_dim:].mul_(6)
    posterior = GaussianLSTMPosterior(len(vocab), latent_dim, embed_dim=6, hidden_dim=6).to(dtype)
    return model, posterior, batch


class TinyBagModel(LatentVariableModel):
    """A nonlinear decoder in full float64 (the sentence VAE takes its log-softmax in fp32,
    too coarse for 1e-5 finite differences): every target ~ Cat(softmax(W tanh(A z + c)))."""

    latent = "continuous"

    def __init__(self, vocab_size, latent_dim):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(latent_dim, 8, dtype=torch.double) * 2)
        self.c = torch.nn.Parameter(torch.randn(8, dtype=torch.double))
        self.W = torch.nn.Parameter(torch.randn(8, vocab_size, dtype=torch.double))
        self.register_buffer("_zeros", torch.zeros(latent_dim, dtype=torch.double))

    def prior(self):
        return torch.distributions.Independent(torch.distributions.Normal(self._zeros, torch.ones_like(self._zeros)), 1)

    def log_likelihood(self, batch, z):  # z (S, B, D) -> (S, B)
        logp = torch.log_softmax(torch.tanh(z @ self.A + self.c) @ self.W, -1)  # (S, B, V)
        counts = torch.zeros(batch.size, logp.size(-1), dtype=logp.dtype)
        counts.scatter_add_(1, batch.targets, batch.mask.to(logp.dtype))
        return (logp * counts).sum(-1)


def _tiny_exact(latent_dim, seed=0):
    torch.manual_seed(seed)
    vocab = Vocab.build(SENTS)
    batch = TextDataset(SENTS, vocab).make_batch(range(len(SENTS)))
    model = TinyBagModel(len(vocab), latent_dim)
    posterior = GaussianLSTMPosterior(len(vocab), latent_dim, embed_dim=6, hidden_dim=6).double()
    return model, posterior, batch


def test_refinement_never_lowers_the_per_example_elbo_on_average():
    model, posterior, batch = _tiny(latent_dim=2)
    with torch.no_grad():
        mean0, logvar0 = posterior.params(batch)
    noise = torch.randn(3000, *mean0.shape)  # common draws to compare the bounds

    def elbo(m, lv):
        with torch.no_grad():
            return gaussian_elbo(model, batch, m, lv, noise=noise)[0]  # (B,)

    start = elbo(mean0, logvar0)
    by_steps = {}
    for steps in (1, 3, 10):
        runs = []
        for seed in range(4):  # average over the refinement's own noise
            torch.manual_seed(seed)
            m, lv = refine_gaussian(model, batch, mean0, logvar0, steps, lr=0.1, samples=8, create_graph=False)
            runs.append(elbo(m, lv))
        by_steps[steps] = torch.stack(runs).mean(0)  # (B,)
        assert (by_steps[steps] >= start - 1e-3).all(), (steps, by_steps[steps] - start)
    assert float(by_steps[1].mean()) <= float(by_steps[3].mean()) <= float(by_steps[10].mean())
    assert float((by_steps[10] - start).mean()) > 0.1  # a real improvement, not noise


def test_refinement_gradient_matches_finite_differences():
    model, posterior, batch = _tiny_exact(latent_dim=2)
    model.requires_grad_(False)
    B, D, steps = batch.size, 2, 3
    noise = [torch.randn(4, B, D, dtype=torch.double) for _ in range(steps + 1)]
    mean0 = torch.randn(B, D, dtype=torch.double) * 0.5
    logvar0 = torch.randn(B, D, dtype=torch.double) * 0.3 - 1

    def final_elbo(m, lv, create_graph):
        mk, lvk = refine_gaussian(model, batch, m, lv, steps, lr=0.2, max_grad_norm=None,
                                  create_graph=create_graph, noise=noise[:steps])
        return gaussian_elbo(model, batch, mk, lvk, noise=noise[-1])[0].sum()

    m, lv = mean0.clone().requires_grad_(), logvar0.clone().requires_grad_()
    g_mean, g_logvar = torch.autograd.grad(final_elbo(m, lv, True), (m, lv))
    h = 1e-5
    for b in range(B):
        for grad, which in ((g_mean, 0), (g_logvar, 1)):
            up = [mean0.clone(), logvar0.clone()]
            down = [mean0.clone(), logvar0.clone()]
            up[which][b, 1] += h
            down[which][b, 1] -= h
            fd = (final_elbo(*up, False) - final_elbo(*down, False)) / (2 * h)
            assert float(grad[b, 1]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)
    # without refinement the gradient would differ: the steps matter
    m0 = mean0.clone().requires_grad_()
    (g0,) = torch.autograd.grad(gaussian_elbo(model, batch, m0, logvar0, noise=noise[-1])[0].sum(), m0)
    assert not torch.allclose(g0, g_mean, atol=1e-3)


def test_objective_encoder_gradient_goes_through_the_refinement():
    """The encoder's gradient from SemiAmortizedELBO = d/dphi of -ELBO(lambda_K(phi)) by finite differences."""
    model, posterior, batch = _tiny_exact(latent_dim=2)
    objective = SemiAmortizedELBO(refine_steps=3, refine_lr=0.2, max_grad_norm=None, samples=2)
    param = posterior.to_params.bias

    def loss():
        torch.manual_seed(0)  # identical draws for every evaluation
        return objective(model, posterior, batch).loss

    out = loss()
    out.backward()
    grad = param.grad.clone()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    h = 1e-5

    def shifted_loss(i, delta):  # the training path (grad enabled), at phi_i + delta
        with torch.no_grad():
            param[i] += delta
        value = float(loss().detach())
        with torch.no_grad():
            param[i] -= delta
        return value

    for i in range(param.numel()):
        up, down = shifted_loss(i, h), shifted_loss(i, -h)
        assert float(grad[i]) == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-6)


def test_sa_elbo_reports_the_refined_bound_in_evaluation_and_trains():
    model, posterior, batch = _tiny(latent_dim=2)
    objective = SemiAmortizedELBO(refine_steps=5, refine_lr=0.5, kl_schedule=0.5, free_bits=0.1)
    model.train()
    out = objective(model, posterior, batch, step=0)
    out.loss.backward()
    assert all(p.grad is not None for p in posterior.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert out.extras["kl_weight"] == 0.5 and out.bound.shape == (batch.size,)
    objective.eval()
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # validation runs under no_grad: refinement still happens
        ev = objective(model, posterior, batch)
    assert float(ev.bound.mean()) > float(ev.extras["elbo_before_refinement"]) - 0.05
    torch.testing.assert_close(ev.bound, ev.reconstruction - ev.kl)


def test_sa_elbo_trains_under_bf16_autocast_through_the_refinement():
    """The fused bf16 output layer's backward is not differentiable; the refinement must switch
    to the plain layer so the encoder's gradient can go through it (second order)."""
    model, posterior, batch = _tiny(latent_dim=2)
    objective = SemiAmortizedELBO(refine_steps=2, refine_lr=0.5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(model, posterior, batch, step=0)
    out.loss.backward()
    grads = [p.grad for p in posterior.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
