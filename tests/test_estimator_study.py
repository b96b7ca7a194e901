"""The estimator study on a tiny M2: row shapes, enumeration is exact, baselines cut variance."""

import json

import torch

from latentlm.data import TextDataset, Vocab
from latentlm.report.estimator_study import ROW_KEYS, estimator_study, write_study
from latentlm.inference import ELBO
from latentlm.inference.posteriors import CategoricalLSTMPosterior
from latentlm.models import MixtureOfRNNLMs
from latentlm.system import System

SENTS = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"], ["c", "c", "b"], ["b", "a"]]


def _tiny_system(K=3):
    torch.manual_seed(0)
    vocab = Vocab.build(SENTS)
    model = MixtureOfRNNLMs(len(vocab), num_components=K, embed_dim=6, hidden_dim=7, component_dim=4)
    posterior = CategoricalLSTMPosterior(len(vocab), K, embed_dim=5, hidden_dim=6)
    batch = TextDataset(SENTS, vocab).make_batch(range(len(SENTS)))
    return System(model, posterior, ELBO(estimator="enumerate")), batch, len(vocab)


def test_estimator_study_rows_enumeration_exact_and_loo_below_plain(tmp_path):
    system, batch, V = _tiny_system()
    estimators = {
        "enumerate": {"type": "elbo", "estimator": "enumerate"},
        "score_function": {"type": "score_function", "baseline": "none"},
        "sf_learned": {"type": "elbo", "estimator": {"type": "score_function", "baseline": "learned"},
                       "warmup": 5},
        "sf_leave_one_out": {"type": "score_function", "baseline": "leave_one_out"},
        "gumbel_tau0.5": {"type": "gumbel", "temperature": 0.5, "min_temperature": 0.5},
        "vimco": {"type": "vimco"},
    }
    rows = estimator_study(system, batch, estimators, draws=40, samples=4, vocab_size=V)
    assert [r["estimator"] for r in rows] == list(estimators)
    assert all(set(r) == set(ROW_KEYS) for r in rows)
    by = {r["estimator"]: r for r in rows}
    assert by["enumerate"]["bias"] < 1e-6 * by["enumerate"]["exact_norm"] and by["enumerate"]["variance"] == 0
    assert by["enumerate"]["cosine"] > 1 - 1e-6
    assert by["sf_leave_one_out"]["variance"] < by["score_function"]["variance"]
    assert by["vimco"]["target"] == "iwae4" and by["score_function"]["target"] == "elbo"
    assert all(r["ms_per_draw"] > 0 for r in rows)
    assert system.training and all(p.requires_grad for p in system.parameters())  # state restored

    paths = write_study(rows, tmp_path)
    assert paths["plot"].stat().st_size > 0
    assert paths["table"].read_text().count("\n") == len(rows) + 2
    assert json.loads(paths["json"].read_text())[0]["estimator"] == "enumerate"


def test_a_run_trained_on_the_exact_marginal_is_studied_with_a_fresh_q(tmp_path):
    from latentlm.config import load_config
    from latentlm.report.estimator_study import run_estimator_study
    from latentlm.training import train

    cfg = tmp_path / "m2.yaml"
    cfg.write_text("data: {name: ptb, train_limit: 40, valid_limit: 20, max_vocab: 200}\n"
                   "model: {type: rnn_mixture, num_components: 3, embed_dim: 8, hidden_dim: 8, component_dim: 4}\n"
                   "objective: {type: exact}\ntrain: {max_steps: 2, batch_size: 8}\n")
    train(load_config(cfg), tmp_path / "run", progress=False)
    rows = run_estimator_study(tmp_path / "run", tmp_path / "study", batch_size=4, draws=3, samples=2,
                               estimators={"enumerate": {"type": "elbo", "estimator": "enumerate"},
                                           "sf_leave_one_out": {"type": "score_function", "baseline": "leave_one_out"}})
    assert [r["estimator"] for r in rows] == ["enumerate", "sf_leave_one_out"]
    assert rows[0]["exact_norm"] > 0 and rows[0]["bias"] < 1e-6 * rows[0]["exact_norm"]
    assert (tmp_path / "study").is_dir()
