"""L9: aggressive inference-network training (He et al. 2019) stops its inner loop by its criterion."""

import pytest
import torch
from torch import nn

from latentlm.data import TextDataset, Vocab
from latentlm.inference import ELBO
from latentlm.inference.base import ObjectiveOutput
from latentlm.inference.posteriors import GaussianLSTMPosterior
from latentlm.models import SentenceVAE
from latentlm.system import System
from latentlm.training.aggressive import AggressiveEncoderTraining

SENTS = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"], ["c", "c", "b", "a", "c"], ["b", "a"]]


@pytest.fixture
def data():
    vocab = Vocab.build(SENTS)
    return vocab, TextDataset(SENTS, vocab)


class ScriptedObjective(nn.Module):
    """Returns the next scripted loss (per token: every batch below has the same size)."""

    needs_posterior = True

    def __init__(self, losses):
        super().__init__()
        self.losses, self.calls = list(losses), 0

    def forward(self, model, posterior, batch, step=0):
        value = self.losses[self.calls]
        self.calls += 1
        param = next(posterior.parameters())
        loss = value * batch.num_tokens / batch.size + 0 * param.sum()
        return ObjectiveOutput(loss=loss, bound=torch.zeros(batch.size))


def _scripted_system(vocab, losses):
    torch.manual_seed(0)
    model = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=4, latent_dim=2)
    posterior = GaussianLSTMPosterior(len(vocab), 2, embed_dim=4, hidden_dim=4)
    return System(model, posterior, ScriptedObjective(losses))


@pytest.mark.parametrize("windows, expected_steps, reason", [
    ([5.0, 4.0, 3.0, 3.5, 1.0], 20, "no improvement"),  # 4th window (steps 16-20) is worse than the 3rd
    ([5.0, 5.0], 10, "no improvement"),                 # no better is not an improvement
    ([9.0 - i for i in range(8)], 30, "max steps"),     # always improving: the step cap stops it
])
def test_inner_loop_stops_by_its_criterion(data, windows, expected_steps, reason):
    vocab, dataset = data
    per_step = [w for w in windows for _ in range(5)]  # check_every = 5 steps per window
    system = _scripted_system(vocab, per_step)
    aggressive = AggressiveEncoderTraining(system, lr=1e-3, max_inner_steps=30, check_every=5)
    batch = dataset.make_batch([0, 1])
    result = aggressive.train_encoder(system, batch, lambda: dataset.make_batch([0, 1]), step=0)
    assert result.steps == expected_steps and result.stopped_by == reason
    assert system.objective.calls == expected_steps


def test_inner_loop_updates_the_encoder_only_and_then_the_decoder_step_skips_it(data):
    vocab, dataset = data
    torch.manual_seed(0)
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=2)
    posterior = GaussianLSTMPosterior(len(vocab), 2, embed_dim=8, hidden_dim=8)
    system = System(model, posterior, ELBO())
    enc0 = [p.detach().clone() for p in posterior.parameters()]
    dec0 = [p.detach().clone() for p in model.parameters()]
    aggressive = AggressiveEncoderTraining(system, lr=1e-2, max_inner_steps=12, check_every=4)
    g = torch.Generator().manual_seed(0)
    sample = lambda: dataset.make_batch(torch.randint(0, len(dataset), (3,), generator=g).tolist())  # noqa: E731
    result = aggressive.train_encoder(system, dataset.make_batch([0, 1, 2]), sample, step=0)
    assert 4 <= result.steps <= 12
    assert any(not torch.equal(a, b) for a, b in zip(enc0, posterior.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(dec0, model.parameters()))
    # the trainer's own step: backward on all, then the hook drops encoder grads
    optimizer = torch.optim.Adam(system.parameters(), lr=1e-2)
    enc1 = [p.detach().clone() for p in posterior.parameters()]
    system(dataset.make_batch([3, 4])).loss.backward()
    aggressive.before_optimizer_step()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(enc1, posterior.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(dec0, model.parameters()))


def test_phase_ends_when_mi_stops_rising_or_after_max_epochs(data, monkeypatch):
    vocab, dataset = data
    system = _scripted_system(vocab, [])
    import latentlm.training.aggressive as mod

    mis = iter([0.5, 0.9, 0.8])
    monkeypatch.setattr(mod, "validation_mutual_information", lambda *a, **k: next(mis))
    aggressive = AggressiveEncoderTraining(system, max_epochs=10)
    assert aggressive.end_epoch(dataset) and aggressive.end_epoch(dataset)
    assert not aggressive.end_epoch(dataset)  # MI fell: back to normal training
    capped = AggressiveEncoderTraining(system, max_epochs=2, stop_on_mi=False)
    assert capped.end_epoch() and not capped.end_epoch()
    restored = AggressiveEncoderTraining(system)
    restored.load_state_dict(aggressive.state_dict())
    assert restored.state_dict() == aggressive.state_dict()
    # once off, the decoder-only hook does nothing
    for p in system.posterior.parameters():
        p.grad = torch.ones_like(p)
    aggressive.before_optimizer_step()
    assert all(p.grad is not None for p in system.posterior.parameters())


def test_validation_mutual_information_runs_on_a_real_posterior(data):
    from latentlm.training.aggressive import validation_mutual_information

    vocab, dataset = data
    torch.manual_seed(0)
    system = System(SentenceVAE(len(vocab), embed_dim=4, hidden_dim=4, latent_dim=2),
                    GaussianLSTMPosterior(len(vocab), 2, embed_dim=4, hidden_dim=4), ELBO())
    mi = validation_mutual_information(system, dataset, batch_size=4)
    assert -0.05 <= mi <= torch.log(torch.tensor(float(len(dataset)))) + 1e-4  # noise can dip below 0


def test_phase_ends_after_its_decoder_step_budget(data):
    vocab, _ = data
    aggressive = AggressiveEncoderTraining(_scripted_system(vocab, []), max_steps=3, stop_on_mi=False)
    assert aggressive.continue_at(1) and aggressive.continue_at(2)
    assert not aggressive.continue_at(3) and not aggressive.active
    unlimited = AggressiveEncoderTraining(_scripted_system(vocab, []))
    assert unlimited.continue_at(10_000)
