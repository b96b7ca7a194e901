"""M11: latent alignment (attention as a latent variable) — checked against brute force.

The fused factored output against explicit softmaxes; the exact marginal against a sum over
every alignment; ELBO <= log p(y | x); the score-function gradients (hard and variational
attention) against the enumerated gradient; beam 1 = greedy; the translate CLI on a file."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from latentlm.cli.main import main as cli
from latentlm.config import load_config
from latentlm.data.parallel import collate_pairs
from latentlm.errors import CorpusError
from latentlm.evaluation.translation import beam_search, greedy_decode
from latentlm.nn.factored_output import exp_shifted, mixture_log_probs, pairwise_target_log_probs
from latentlm.system import build_system, source_size
from latentlm.training import load_corpus

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
CONFIGS = REPO / "configs" / "multi30k"
SMALL = ["data.data_dir=" + str(DATA), "model.embed_dim=16", "model.hidden_dim=16", "model.dropout=0.0"]


def _system(row: str, extra=(), seed: int = 0):
    overrides = list(SMALL) + list(extra)
    if row.startswith("variational"):
        overrides += ["posterior.embed_dim=16", "posterior.hidden_dim=16", "posterior.dropout=0.0"]
    config = load_config(CONFIGS / f"{row}.yaml", overrides)
    vocab, data = load_corpus(config, splits=("train", "test"))
    torch.manual_seed(seed)
    system = build_system(config, len(vocab), vocab.itos, source_size(vocab))
    return system, vocab, data


def _tiny_batch(vocab_size=9, source_vocab=7):
    g = torch.Generator().manual_seed(3)
    sources = [torch.randint(4, source_vocab, (n,), generator=g) for n in (3, 2)]
    targets = [torch.cat([torch.tensor([1]), torch.randint(4, vocab_size, (n,), generator=g), torch.tensor([2])])
               for n in (2, 1)]
    return collate_pairs(sources, targets, [0, 1])


def test_fused_output_equals_explicit_softmaxes():
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(2, 4, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    y = torch.randint(0, 11, (2, 4), generator=g)
    explicit = (a[:, :, None, :] + c[:, None, :, :]).log_softmax(-1)  # (B, T, S, V)
    want = explicit.gather(-1, y[:, :, None, None].expand(-1, -1, 5, 1)).squeeze(-1)
    torch.testing.assert_close(pairwise_target_log_probs(a, c, y), want, rtol=1e-5, atol=1e-5)
    w = torch.softmax(torch.randn(2, 4, 5, generator=g), -1)
    want_mix = torch.logsumexp(w.log()[..., None] + explicit, 2)
    torch.testing.assert_close(mixture_log_probs(a, exp_shifted(c)[0], w), want_mix, rtol=1e-5, atol=1e-5)


def test_exact_marginal_equals_sum_over_every_alignment():
    from latentlm.models.alignment import AttentionTranslator

    torch.manual_seed(0)
    model = AttentionTranslator(vocab_size=9, source_vocab_size=7, embed_dim=8, hidden_dim=8, dropout=0.0).eval()
    batch = _tiny_batch()
    with torch.no_grad():
        terms = model.local_terms(batch)
        log_px = model.log_marginal(batch)
        for b in range(batch.size):
            T, S = int(batch.lengths[b]), int(batch.source_lengths[b])
            total = 0.0
            # every one of the S^T alignments, scored through the one-hot path (not the fused table)
            for z in itertools.product(range(S), repeat=T):
                w = torch.zeros_like(terms.prior_logits)
                w[:, :, 0] = 1.0
                w[b, :T] = 0.0
                for t, s in enumerate(z):
                    w[b, t, s] = 1.0
                ll = terms.log_likelihood_at(w)[b]
                total += math.exp(sum(float(terms.prior_logits[b, t, s] + ll[t]) for t, s in enumerate(z)))
            assert math.isclose(math.log(total), float(log_px[b]), rel_tol=1e-5)


@pytest.mark.parametrize("row", ["hard", "variational_enum", "variational_sf", "variational_gumbel"])
def test_elbo_below_exact_log_likelihood(row):
    system, vocab, data = _system(row)
    system.eval()
    batch = data["train"].make_batch(list(range(8)))
    with torch.no_grad():
        exact = system.objective.enumerated(system.model, system.posterior, batch)
        out = system(batch)
    assert (exact["elbo"] <= exact["log_marginal"] + 1e-4).all()
    assert (exact["kl"] >= -1e-5).all()
    torch.testing.assert_close(out.log_marginal if out.log_marginal is not None else exact["log_marginal"],
                               exact["log_marginal"])
    if row == "variational_enum":  # no sampling: the training bound is the enumerated one
        torch.testing.assert_close(out.bound, exact["elbo"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("row", ["hard", "variational_sf"])
def test_score_function_gradient_is_unbiased(row):
    """Mean of many single-sample REINFORCE gradients (soft-attention baseline) vs the
    enumerated gradient of the same bound, coordinate-wise within 4.5 standard errors."""
    system, vocab, data = _system(row)
    system.eval()
    batch = data["train"].make_batch([1, 2])
    params = [p for n, p in system.named_parameters() if n.startswith(("posterior.score", "model.key"))]
    objective = system.objective
    estimator = objective.estimator
    objective.estimator = "enumerate"
    exact = torch.autograd.grad(system(batch).loss, params)
    objective.estimator = estimator
    draws = []
    for i in range(400):
        torch.manual_seed(i)
        draws.append(torch.cat([g.flatten() for g in torch.autograd.grad(system(batch).loss, params)]))
    draws = torch.stack(draws)
    want = torch.cat([g.flatten() for g in exact])
    se = draws.std(0) / math.sqrt(len(draws))
    z = ((draws.mean(0) - want).abs() / (se + 1e-6 * want.abs().max()))
    assert want.abs().max() > 0
    assert float(z.max()) < 4.5, f"max |mean - exact| / se = {float(z.max()):.2f}"


def test_beam_one_is_greedy_and_beam_scores_at_least_as_well():
    system, vocab, data = _system("exact")
    # a few steps so the decoder is not uniform
    opt = torch.optim.Adam(system.parameters(), lr=0.01)
    for step in range(15):
        batch = data["train"].make_batch(list(range(step * 16, step * 16 + 16)))
        opt.zero_grad()
        system(batch).loss.backward()
        opt.step()
    system.eval()
    batch = data["test"].make_batch(list(range(12)))
    greedy = greedy_decode(system.model, batch, max_len=25)
    assert beam_search(system.model, batch, beam=1, max_len=25) == greedy
    beamed = beam_search(system.model, batch, beam=4, max_len=25, length_penalty=0.0)

    def score(hyps):  # log p(y | x) of whole hypotheses incl. </s>
        pairs = collate_pairs([data["test"].sources[i] for i in range(12)],
                              [torch.tensor([1, *h, 2]) for h in hyps], list(range(12)))
        with torch.no_grad():
            return system.model.log_marginal(pairs)
    # without length normalization, beam search finds a hypothesis at least as likely as greedy's
    assert (score(beamed) >= score(greedy) - 1e-4).all()


def test_training_lowers_the_loss_and_translate_round_trips_a_file(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(CONFIGS / "variational_enum.yaml"), "--out", str(out), "--data-dir", str(DATA), "--quiet",
            "--set", "model.embed_dim=32", "--set", "model.hidden_dim=32", "--set", "posterior.embed_dim=16",
            "--set", "posterior.hidden_dim=16", "--set", "train.batch_size=16", "--set", "train.max_steps=60",
            "--set", "train.log_every=5", "--set", "train.lr=0.01"]
    assert cli(args) == 0
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    head = rows[0]
    losses = [float(r[head.index("loss")]) for r in rows[1:] if r[0] == "train"]
    assert losses[-1] < losses[0] - 5, losses
    src = tmp_path / "in.de"
    src.write_text("ein mann schläft .\n\nzwei qwertzuiop hunde .\n", encoding="utf-8")
    dst = tmp_path / "out.en"
    assert cli(["translate", str(out), "--input", str(src), "--output", str(dst), "--beam", "3"]) == 0
    lines = dst.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[3] == ""  # three lines, each ended
    assert lines[0].strip() and lines[1] == "" and lines[2].strip()
    bad = tmp_path / "bad.de"
    bad.write_bytes(b"ein mann\n\xff\xfe kaputt\n")
    assert cli(["translate", str(out), "--input", str(bad)]) != 0
    # evaluate: exact PPL, the ELBO and BLEU, and heatmaps in the run's figures/
    assert cli(["evaluate", str(out), "--split", "test", "--limit", "20", "--beam", "2", "--json"]) == 0
    assert sorted(p.name for p in (out / "figures").glob("alignment_*.png")) == [
        "alignment_0.png", "alignment_1.png", "alignment_2.png"]
    # the report of the run embeds them
    assert cli(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert html.count("alignment_") >= 3


def test_evaluate_reports_bleu_and_exact_nll(tmp_path, capsys):
    system, vocab, data = _system("soft")
    from latentlm.evaluation import evaluate
    result = evaluate(system, data["test"].head(10), batch_size=5, beam=2, max_decode_len=10)
    assert 0.0 <= result["bleu"] <= 100.0 and "tok:none" in result["bleu_signature"]
    assert result["samples"] == 0 and result["nll"] > 0


def test_parallel_corpus_errors(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.de").write_text("a b\nc d\n", encoding="utf-8")
        (tmp_path / f"{split}.en").write_text("x y\n", encoding="utf-8")
    config = load_config(CONFIGS / "soft.yaml", ["data.data_dir=" + str(tmp_path)])
    with pytest.raises(CorpusError, match="2 lines but .* has 1"):
        load_corpus(config)
    (tmp_path / "train.en").write_bytes(b"x y\n\xff z\n")
    with pytest.raises(CorpusError, match="train.en:2: bytes that are not UTF-8"):
        load_corpus(config)


def test_soft_attention_is_not_a_latent_model_for_local_elbo():
    from latentlm.errors import ConfigError
    with pytest.raises(ConfigError, match="attention: soft"):
        _system("hard", ["model.attention=soft"])


def test_grid_takes_the_alignment_rows_and_reports_bleu(tmp_path):
    """`latentlm grid` trains and evaluates translator rows like every other model (tiny budget)."""
    out = tmp_path / "grid"
    sets = ["model.embed_dim=16", "model.hidden_dim=16", "train.max_steps=4", "train.batch_size=32", "eval.beam=2",
            "eval.max_decode_len=8"]
    args = ["grid", str(CONFIGS / "soft.yaml"), str(CONFIGS / "hard.yaml"), "--out", str(out), "--data-dir", str(DATA),
            "--test-limit", "8", "--precision", "fp32", "--gap-sentences", "0"]
    for s in sets:
        args += ["--set", s]
    assert cli(args) == 0
    table = next(out.glob("*.md")).read_text(encoding="utf-8")
    assert "BLEU" in table and "soft" in table and "hard" in table


@pytest.mark.parametrize("shared", [False, True])
def test_fused_pairwise_gradient_equals_autograd_of_explicit_softmaxes(shared):
    """The hand-written backward of the pairwise table against autograd through the explicit
    (B, T, S, V) log-softmaxes, for per-sentence c (B, S, V) and a shared c (S, V), with an
    arbitrary upstream gradient (and a target repeated across positions)."""
    g = torch.Generator().manual_seed(1)
    B, T, S, V = 2, 4, 3, 7
    a = (torch.randn(B, T, V, generator=g) * 3).requires_grad_()
    c = (torch.randn(*((S, V) if shared else (B, S, V)), generator=g) * 3).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1] = y[0, 2]
    up = torch.randn(B, T, S, generator=g)
    (pairwise_target_log_probs(a, c, y) * up).sum().backward()
    got = a.grad.clone(), c.grad.clone()
    a.grad = c.grad = None
    cc = c[None].expand(B, S, V) if shared else c
    explicit = (a[:, :, None, :] + cc[:, None, :, :]).log_softmax(-1)
    want = explicit.gather(-1, y[:, :, None, None].expand(-1, -1, S, 1)).squeeze(-1)
    (want * up).sum().backward()
    torch.testing.assert_close(got[0], a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], c.grad, rtol=1e-5, atol=1e-5)


def test_bilstm_encode_equals_packed_bidirectional_lstm():
    """The two padded direction runs give the packed bidirectional LSTM's states at every real
    position, zeros at the padding, and the same gradients."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from latentlm.models.alignment import bilstm_encode

    torch.manual_seed(0)
    embed = torch.nn.Embedding(11, 6, padding_idx=0)
    lstm = torch.nn.LSTM(6, 5, batch_first=True, bidirectional=True)
    lengths = torch.tensor([4, 1, 6, 3])
    tokens = torch.randint(1, 11, (4, 6)) * (torch.arange(6)[None] < lengths[:, None])
    got = bilstm_encode(embed, lstm, torch.nn.Identity(), tokens, lengths)
    got.pow(2).sum().backward()
    grads = [p.grad.clone() for p in lstm.parameters()]
    lstm.zero_grad()
    packed = pack_padded_sequence(embed(tokens), lengths, batch_first=True, enforce_sorted=False)
    want = pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=6)[0]
    want.pow(2).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, lstm.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
