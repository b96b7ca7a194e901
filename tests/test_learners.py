"""EM and generalized EM as learners of the one training loop, and the three data formats,
all through ``latentlm train`` / ``evaluate`` / ``tag`` / ``cluster`` on tiny data built here."""

import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from latentlm.config import load_config
from latentlm.data.documents import BagOfWords
from latentlm.data.loading import TaggedDataset
from latentlm.errors import ConfigError
from latentlm.training import load_corpus, train

TOPICS = [["apple", "banana", "cherry", "grape", "mango", "lemon", "peach", "plum"],
          ["rocket", "planet", "orbit", "galaxy", "comet", "nebula", "asteroid", "telescope"],
          ["guitar", "violin", "piano", "drum", "flute", "cello", "trumpet", "harp"]]
LEXICON = {"DT": ["the", "a", "this"], "NN": ["cat", "dog", "mat", "car", "man"], "VB": ["sat", "ran", "saw", "ate"],
           "IN": ["on", "in", "under"]}


def write_docs(path, per_topic=20, empty=0, seed=0):
    g = random.Random(seed)
    lines = [{"id": f"{k}-{i}", "label": f"t{k}", "text": " ".join(g.choice(words) for _ in range(g.randint(10, 30)))}
             for i in range(per_topic) for k, words in enumerate(TOPICS)]
    lines += [{"id": f"e{i}", "label": "none", "text": "the and of it is"} for i in range(empty)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def write_tagged(path, sentences=80, seed=0):
    g = random.Random(seed)
    out = []
    for _ in range(sentences):
        tags = ["DT", "NN", "VB"] + (["IN", "DT", "NN"] if g.random() < 0.5 else [])
        out.append("\n".join(f"{g.choice(LEXICON[t])}\t{t}" for t in tags))
    path.write_text("\n\n".join(out) + "\n")
    return path


def config(tmp_path, text, overrides=()):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


def nb_config(tmp_path, docs, epochs=12, em="{smoothing: 0.0}", overrides=()):
    return config(tmp_path, f"""
data: {{name: docs, format: documents, files: {{train: {docs}, valid: {docs}, test: {docs}}}, min_df: 1}}
model: {{type: nb_mixture, num_clusters: 3}}
objective: {{type: exact}}
train: {{learner: em, epochs: {epochs}, batch_size: 16, checkpoint_every: 3, early_stop_patience: 1000, em: {em}}}
""", overrides)


def hmm_config(tmp_path, tsv, learner="em", model="{type: hmm, num_states: 4, init_scale: 0.1}", epochs=8, extra=""):
    return config(tmp_path, f"""
data: {{name: pos, format: tagged, files: {{train: {tsv}, valid: {tsv}}}}}
model: {model}
objective: {{type: exact}}
train: {{learner: {learner}, epochs: {epochs}, batch_size: 16, lr: 0.01, checkpoint_every: 2, early_stop_patience: 1000 {extra}}}
""")


def e_step_rows(run):
    with (run / "metrics.csv").open() as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == "e_step"]


def monotone(values, slack=1e-6):
    return all(b <= a + slack * max(1.0, abs(a)) for a, b in zip(values, values[1:]))


# ---- the data formats ----------------------------------------------------------------------


def test_documents_and_tagged_formats_load_through_the_config(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", empty=2)
    cfg = config(tmp_path, f"""
data: {{name: docs, format: documents, files: {{train: {docs}, test: {docs}}}, valid_fraction: 0.1, min_df: 1,
        skip_empty: true}}
""")
    vocab, data = load_corpus(cfg)
    assert all(isinstance(d, BagOfWords) for d in data.values())
    assert len(data["train"]) + len(data["valid"]) == 60 and len(data["valid"]) == 6  # 2 empty skipped
    assert len(vocab) == 4 + 24 and data["test"].num_tokens > 0
    batch = data["train"].make_batch(data["train"].batch_indices(7, shuffle=True, seed=0, epoch=1)[0])
    assert batch.size == 7 and batch.num_tokens == int(batch.lengths.sum())

    tsv = write_tagged(tmp_path / "tags.tsv")
    vocab, data = load_corpus(hmm_config(tmp_path, tsv), splits=("train", "valid"))
    assert isinstance(data["train"], TaggedDataset) and len(data["train"]) == 80
    assert data["train"].tags[0][:3] == ["DT", "NN", "VB"]
    assert data["train"].num_tokens == sum(len(t) + 1 for t in data["train"].tags)  # words + </s>

    with pytest.raises(ConfigError, match="data.format"):
        load_corpus(config(tmp_path, "data: {format: xml}"))


# ---- EM through the loop ---------------------------------------------------------------------


def test_nb_mixture_em_log_likelihood_never_decreases_over_epochs(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl")
    summary = train(nb_config(tmp_path, docs), tmp_path / "run", progress=False)
    rows = e_step_rows(tmp_path / "run")
    assert summary["epoch"] == 12 and len(rows) == 12
    nll = [float(r["nll"]) for r in rows]
    assert monotone(nll) and nll[-1] < nll[0]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_hmm_em_log_likelihood_never_decreases_over_epochs(tmp_path):
    tsv = write_tagged(tmp_path / "tags.tsv")
    train(hmm_config(tmp_path, tsv), tmp_path / "run", progress=False)
    nll = [float(r["nll"]) for r in e_step_rows(tmp_path / "run")]
    assert len(nll) == 8 and monotone(nll) and nll[-1] < nll[0] - 0.1


def test_annealed_em_runs_to_convergence_and_stops(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl")
    cfg = nb_config(tmp_path, docs, epochs=500,
                    em="{smoothing: 0.01, tol: 1.0e-6, anneal: {beta_start: 0.05, beta_growth: 2.0, iters_per_beta: 3, "
                       "perturbation: 0.1}}")
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["stopped"].startswith("converged") and summary["epoch"] < 500
    betas = [float(r["beta"]) for r in e_step_rows(tmp_path / "run")]
    assert betas[0] == pytest.approx(0.05) and betas[-1] == 1.0 and betas == sorted(betas)


def _cli(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "latentlm.cli.main", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["nb_mixture", "hmm"])
def test_killed_em_run_resumes_exactly(tmp_path, kind):
    if kind == "nb_mixture":
        docs = write_docs(tmp_path / "docs.jsonl")
        nb_config(tmp_path, docs, epochs=6, em="{smoothing: 0.01, anneal: {beta_start: 0.1, beta_growth: 2.0, "
                                               "iters_per_beta: 2, perturbation: 0.1}}")
        kill_at = 13  # 4 batches per epoch: inside epoch 4, after the epoch-3 checkpoint
    else:
        hmm_config(tmp_path, write_tagged(tmp_path / "tags.tsv"), epochs=5)
        kill_at = 12  # 5 batches per epoch: inside epoch 3
    cfg = tmp_path / "config.yaml"
    proc = _cli("train", cfg, "--out", tmp_path / "whole", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = _cli("train", cfg, "--out", tmp_path / "killed", "--quiet", env={"LATENTLM_KILL_AT_STEP": str(kill_at)})
    assert proc.returncode != 0  # SIGKILL
    proc = _cli("train", cfg, "--out", tmp_path / "killed", "--quiet", "--resume")
    assert proc.returncode == 0, proc.stderr
    whole, resumed = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("whole", "killed"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert [r["nll"] for r in e_step_rows(tmp_path / "whole")] == [r["nll"] for r in e_step_rows(tmp_path / "killed")]


def test_neural_hmm_generalized_em_runs_and_climbs(tmp_path):
    tsv = write_tagged(tmp_path / "tags.tsv")
    cfg = hmm_config(tmp_path, tsv, learner="gem", epochs=5, extra=", em: {m_steps: 4}",
                     model="{type: neural_hmm, num_states: 4, dim: 16, char_cnn: true, word_embeddings: false, "
                           "char_options: {filters: 8, widths: [1, 2], char_dim: 8}}")
    summary = train(cfg, tmp_path / "run", progress=False)
    nll = [float(r["nll"]) for r in e_step_rows(tmp_path / "run")]
    assert summary["epoch"] == 5 and len(nll) == 5 and nll[-1] < nll[0]
    proc = _cli("tag", tmp_path / "run", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["sentences"] == 80 and 0 < result["many_to_one"] <= 1 and 0 <= result["v_measure"] <= 1


def test_em_learner_refuses_a_model_without_the_capability(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl")
    cfg = nb_config(tmp_path, docs, overrides=["model={type: topic_model, num_topics: 3, latent_dim: 2}"])
    with pytest.raises(ConfigError, match="ClosedFormEM"):
        train(cfg, tmp_path / "run", progress=False)


def test_hmm_em_run_tags_its_training_sentences(tmp_path):
    tsv = write_tagged(tmp_path / "tags.tsv")
    train(hmm_config(tmp_path, tsv, epochs=15), tmp_path / "run", progress=False)
    proc = _cli("tag", tmp_path / "run", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tokens"] == sum(1 for line in tsv.read_text().splitlines() if line)
    assert result["many_to_one"] > 0.6 and {"one_to_one", "v_measure", "states_used"} <= set(result)
    proc = _cli("evaluate", tmp_path / "run", "--split", "train", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ppl"] > 1


# ---- a document VAE through the same loop (M10) ------------------------------------------------


def test_topic_model_trains_and_evaluates_on_documents(tmp_path):
    write_docs(tmp_path / "train.jsonl", empty=2, seed=0)
    write_docs(tmp_path / "test.jsonl", per_topic=6, empty=1, seed=1)
    cfg = config(tmp_path, f"""
data: {{name: docs, format: documents, files: {{train: {tmp_path / 'train.jsonl'}, test: {tmp_path / 'test.jsonl'}}},
        valid_fraction: 0.1, min_df: 1, skip_empty: true}}
model: {{type: topic_model, num_topics: 3, latent_dim: 3, init_docs: 5}}
posterior: {{type: gaussian_bow, hidden_dim: 32, dropout: 0.3, bound: [10.0, 5.0]}}
objective: {{type: elbo}}
train: {{epochs: 6, batch_size: 10, lr: 0.02, clip: 10.0}}
eval: {{samples: 20, batch_size: 20}}
""")
    train(cfg, tmp_path / "run", progress=False)
    proc = _cli("evaluate", tmp_path / "run", "--split", "test", "--topics", 5, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["examples"] == 18  # the empty test document is skipped
    assert 1 < result["ppl"] <= result["ppl_bound"] * 1.01 < 24 * 1.5  # IS within the bound, below uniform
    assert len(result["topics"]) == 3 and -1 <= result["npmi_mean"] <= 1


@pytest.mark.parametrize("clip", [0.0, 1.0, 100.0])
def test_clip_gradients_equals_torch_clip_grad_norm(clip):
    """The same norm and the same gradients as clip_grad_norm_ (0: no clipping), without its
    multiply-by-one pass when the norm is already below the limit."""
    from latentlm.nn.gradients import clip_gradients

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(2))]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    for x, y in zip(a[:3], b[:3]):  # the last parameter has no gradient
        x.grad = torch.randn_like(x)
        y.grad = x.grad.clone()
    before = [x.grad.data_ptr() for x in a[:3]]
    torch.testing.assert_close(clip_gradients(a, clip), torch.nn.utils.clip_grad_norm_(b, clip or float("inf")))
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x.grad, y.grad)
    assert [x.grad.data_ptr() for x in a[:3]] == before and a[3].grad is None
    for bad in (float("inf"), float("nan")):  # a diverged step: the same gradients as torch's
        x, y = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        x.grad, y.grad = torch.tensor([1.0, bad, 2.0]), torch.tensor([1.0, bad, 2.0])
        torch.testing.assert_close(clip_gradients([x], 5.0), torch.nn.utils.clip_grad_norm_([y], 5.0), equal_nan=True)
        torch.testing.assert_close(x.grad, y.grad, equal_nan=True)


@pytest.mark.parametrize("opt", ["sgd", "sgd_momentum", "adam"])
@pytest.mark.parametrize("clip", [0.0, 1.0, 100.0])
def test_clipped_step_equals_clip_then_step(opt, clip):
    """clipped_step updates the parameters exactly as clip_grad_norm_ followed by step() does
    (plain SGD folds the factor into this step's lr, which is restored; the others clip)."""
    from latentlm.nn.gradients import clipped_step, gradient_norm, plain_sgd

    def make(params):
        if opt == "adam":
            return torch.optim.Adam(params, lr=0.1)
        return torch.optim.SGD(params, lr=0.5, momentum=0.9 if opt == "sgd_momentum" else 0.0)

    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    oa, ob = make(a), make(b)
    assert plain_sgd(oa) == (opt == "sgd")
    for _ in range(3):
        grads = [torch.randn_like(x) * 3 for x in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        clipped_step(oa, a, gradient_norm(a), clip)
        torch.nn.utils.clip_grad_norm_(b, clip or float("inf"))
        ob.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
    assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]


def test_gradient_norm_equals_torch_total_norm():
    """The dot-product norm (dense fp32 CPU gradients) and the fallback (a strided one) agree
    with torch's get_total_norm, and a non-finite gradient gives a non-finite norm."""
    from latentlm.nn.gradients import gradient_norm

    torch.manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(50, 7)), torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    for p in ps[:2]:
        p.grad = torch.randn_like(p) * 10
    want = torch.nn.utils.get_total_norm([p.grad for p in ps[:2]])
    torch.testing.assert_close(gradient_norm(ps), want)
    ps[0].grad = torch.randn(7, 50).t()  # not contiguous: the fallback
    torch.testing.assert_close(gradient_norm(ps), torch.nn.utils.get_total_norm([p.grad for p in ps[:2]]))
    ps[0].grad[3, 2] = float("nan")
    assert not torch.isfinite(gradient_norm(ps[:1]))
