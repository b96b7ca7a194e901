"""L7: planar and IAF flows — log-det-Jacobians, normalization, and use in the ELBO / IWAE."""

import math

import pytest
import torch
from torch import nn

from latentlm.data import TextDataset, Vocab
from latentlm.inference import ELBO, IWAE, POSTERIORS
from latentlm.inference.flows import FlowDistribution, FlowLSTMPosterior, IAFLayer, PlanarFlow
from latentlm.models import SentenceVAE

# IAF gates shrink dimensions multiplicatively: a large perturbation makes the map
# ill-conditioned (sigma ~ 1e-4), so IAF weights get a milder one.
PERTURB = {PlanarFlow: 0.8, IAFLayer: 0.15}


def _flow(cls, dim, layers=3, context_dim=4, batch=2, seed=0, perturb=None):
    torch.manual_seed(seed)
    stack = nn.ModuleList(cls(dim, context_dim) for _ in range(layers)).double()
    with torch.no_grad():  # move away from the (near-)identity initialization
        for p in stack.parameters():
            p.add_(torch.randn_like(p) * (perturb or PERTURB[cls]))
    mean = torch.randn(batch, dim, dtype=torch.double) * 0.5
    logvar = torch.randn(batch, dim, dtype=torch.double) * 0.3
    context = torch.randn(batch, context_dim, dtype=torch.double)
    return FlowDistribution(mean, logvar, stack, context)


@pytest.mark.parametrize("cls", [PlanarFlow, IAFLayer])
@pytest.mark.parametrize("dim", [1, 2, 4])
def test_log_det_matches_autograd_jacobian(cls, dim):
    q = _flow(cls, dim)
    z0 = torch.randn(q.batch_shape[0], dim, dtype=torch.double)
    _, log_det = q.transform(z0)
    for b in range(z0.size(0)):
        def f(x, b=b):
            rows = [x if i == b else z0[i] for i in range(z0.size(0))]
            return q.transform(torch.stack(rows))[0][b]

        jac = torch.autograd.functional.jacobian(f, z0[b])  # (D, D)
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(log_det[b], logabs, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("cls", [PlanarFlow, IAFLayer])
def test_inverse_recovers_the_base_sample_and_the_cached_density(cls):
    q = _flow(cls, 3)
    z = q.rsample((5,))  # (S, B, D)
    cached = q.log_prob(z)
    by_inverse = q.log_prob(z.detach().clone())  # not the cached tensor: goes through the inverse
    assert cached.shape == (5, 2)
    torch.testing.assert_close(by_inverse, cached, atol=1e-8, rtol=1e-8)


def test_planar_constraint_keeps_the_map_invertible():
    torch.manual_seed(0)
    layer = PlanarFlow(3, 4)
    with torch.no_grad():
        layer.to_params.weight.mul_(300)  # huge raw u, w: u_hat must still satisfy w.u_hat > -1
    u, w, _ = layer.params(torch.randn(64, 4))
    assert ((w * u).sum(-1) > -1).all()


@pytest.mark.parametrize("cls", [PlanarFlow, IAFLayer])
def test_density_integrates_to_one_in_2d(cls):
    q = _flow(cls, 2, batch=1, perturb=0.5 if cls is PlanarFlow else None)  # smooth enough for the grid
    with torch.no_grad():
        _, log_det = q.transform(q.base.sample((1000,)))
    assert float(log_det.std()) > 0.1  # a real deformation, not the identity
    # grid quadrature of exp(log q(z)) over a box holding all but a negligible tail
    grid = torch.linspace(-9, 9, 301 if cls is PlanarFlow else 181, dtype=torch.double)  # IAF inverse: D passes
    zz = torch.cartesian_prod(grid, grid)[:, None, :]  # (G*G, 1, 2)
    with torch.no_grad():
        mass = q.log_prob(zz).exp().sum() * (grid[1] - grid[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)
    # Monte Carlo: E_{z ~ r}[q(z) / r(z)] = 1 for a wide Gaussian proposal r
    torch.manual_seed(1)
    r = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.double), 9 * torch.eye(2, dtype=torch.double))
    z = r.sample((100_000,))[:, None, :]
    with torch.no_grad():
        ratio = (q.log_prob(z)[:, 0] - r.log_prob(z[:, 0])).exp()
    assert float(ratio.mean()) == pytest.approx(1.0, abs=4 * float(ratio.std()) / math.sqrt(len(ratio)) + 1e-3)


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_flow_posterior_trains_with_elbo_and_iwae(flow):
    torch.manual_seed(0)
    sents = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"]]
    vocab = Vocab.build(sents)
    batch = TextDataset(sents, vocab).make_batch(range(len(sents)))
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=3)
    posterior = POSTERIORS["flow_lstm"](len(vocab), 3, flow=flow, layers=2, embed_dim=8, hidden_dim=8,
                                        context_dim=4, flow_hidden_dim=8)
    assert isinstance(posterior, FlowLSTMPosterior)
    for objective in (ELBO(samples=2), IWAE(samples=3)):
        out = objective(model, posterior, batch)
        assert out.bound.shape == (4,) and torch.isfinite(out.bound).all()
        out.loss.backward()
        grads = [p.grad for p in posterior.layers.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
        posterior.zero_grad()
    out = ELBO(samples=1)(model, posterior, batch)  # no closed-form KL: Monte Carlo, same samples
    torch.testing.assert_close(out.bound, out.reconstruction - out.kl)


def _flow_pair():
    torch.manual_seed(0)
    sents = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"]]
    vocab = Vocab.build(sents)
    batch = TextDataset(sents, vocab).make_batch(range(len(sents)))
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=3)
    posterior = POSTERIORS["flow_lstm"](len(vocab), 3, flow="planar", layers=2, embed_dim=8, hidden_dim=8,
                                        context_dim=4)
    return model, posterior, batch


def test_sa_vae_and_per_dimension_free_bits_refuse_a_flow_posterior():
    """SA-VAE would refine only the base Gaussian, and a per-dimension floor on a flow's KL
    (which has no per-dimension split) would silently become a total one: both are refused."""
    from latentlm.config import config_from_dict
    from latentlm.errors import ConfigError
    from latentlm.inference import SemiAmortizedELBO
    from latentlm.inference.base import GaussianPosterior
    from latentlm.system import build_system

    model, posterior, batch = _flow_pair()
    assert not isinstance(posterior, GaussianPosterior)
    with pytest.raises(ConfigError, match="refining the base alone"):
        SemiAmortizedELBO(refine_steps=2)(model, posterior, batch)
    with pytest.raises(ConfigError, match="free bits per dimension"):
        ELBO(free_bits=0.5)(model, posterior, batch)
    base = {"data": {"name": "x"}, "model": {"type": "sentence_vae", "embed_dim": 8, "hidden_dim": 8, "latent_dim": 3},
            "posterior": {"type": "flow_lstm", "embed_dim": 8, "hidden_dim": 8}}
    for objective, match in (({"type": "sa_elbo"}, "sa_elbo"), ({"type": "elbo", "free_bits": 0.5}, "free bits")):
        with pytest.raises(ConfigError, match=match):  # at build time, before any training
            build_system(config_from_dict({**base, "objective": objective}), 10)


def test_a_total_free_bits_floor_on_a_flow_is_a_floor_on_the_total_kl():
    model, posterior, batch = _flow_pair()
    out = ELBO(free_bits=1e3, free_bits_per_dimension=False)(model, posterior, batch)  # far below the floor
    torch.testing.assert_close(out.loss, -out.reconstruction.mean() + 1e3)
    out.loss.backward()  # the KL term is constant there: only the reconstruction's gradient
    low = ELBO(free_bits=1e-6, free_bits_per_dimension=False)(model, posterior, batch)  # above the floor
    torch.testing.assert_close(low.loss, -low.bound.mean())


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_reconstructions_and_interpolations_take_a_flow_posterior(flow):
    """A flow q has no closed-form mean: a sentence's code is the flow's image of the base mean
    (deterministic), so reconstruct / interpolate (and the report's tables) work for flow rows."""
    from latentlm.evaluation import encode_means, interpolate, reconstruct

    sentences = [["the", "cat", "sat"], ["a", "dog", "ran", "far"]]
    vocab = Vocab.build(sentences)
    torch.manual_seed(0)
    posterior = FlowLSTMPosterior(len(vocab), 4, flow=flow, layers=2, embed_dim=8, hidden_dim=8, context_dim=4,
                                  flow_hidden_dim=8).eval()
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=4).eval()
    codes = encode_means(posterior, vocab, sentences)
    assert codes.shape == (2, 4) and torch.equal(codes, encode_means(posterior, vocab, sentences))
    batch = TextDataset(sentences, vocab).make_batch([0, 1])
    q = posterior(batch)
    torch.testing.assert_close(codes, q.transform(q.base.mean)[0])
    assert len(reconstruct(model, posterior, vocab, sentences)) == 2
    assert len(interpolate(model, posterior, vocab, *sentences, steps=3)) == 3
