"""M9 neural hidden semi-Markov model: exact marginal against enumeration, a proper
distribution, training by `latentlm train`, evaluation and Viterbi segmentations."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from enumeration import compositions

from latentlm.cli.main import main
from latentlm.data.batching import TextDataset
from latentlm.data.vocab import Vocab
from latentlm.models.hsmm import NeuralHSMM

SENTENCES = ["the dog runs".split(), "a cat".split(), "the big dog runs fast".split(), "dogs".split()]




@pytest.mark.parametrize("context", [False, True])
def test_log_marginal_is_the_sum_over_segmentations(context):
    torch.manual_seed(0)
    vocab = Vocab.build(SENTENCES)
    data = TextDataset(SENTENCES, vocab)
    model = NeuralHSMM(len(vocab), num_states=2, max_length=3, embed_dim=8, hidden_dim=8, context=context).double()
    with torch.no_grad():
        for p in (model.init_logits, model.trans_logits, model.length_logits):
            p.normal_()
    batch = data.make_batch(list(range(len(SENTENCES))))
    got = model.log_marginal(batch)
    word_lp, n = model.segment_word_log_probs(batch)
    log_init, log_trans, log_len = (x.detach() for x in model.log_probs())
    K = 2
    for b, words in enumerate(SENTENCES):
        total = []
        for parts in compositions(len(words), 3):
            starts = [sum(parts[:i]) for i in range(len(parts))]
            for ks in itertools.product(range(K), repeat=len(parts)):
                s = log_init[ks[0]] + log_trans[ks[-1], K]
                s = s + sum(log_trans[a, c] for a, c in zip(ks, ks[1:]))
                s = s + sum(log_len[k, d - 1] + word_lp[b, st, :d, k].sum() for st, d, k in zip(starts, parts, ks))
                total.append(s)
        assert got[b].item() == pytest.approx(torch.logsumexp(torch.stack(total), 0).item(), abs=1e-9)


def test_segment_word_probabilities_are_normalized():
    torch.manual_seed(1)
    vocab = Vocab.build(SENTENCES)
    model = NeuralHSMM(len(vocab), num_states=3, max_length=2, embed_dim=8, hidden_dim=8).double()
    # every word of the vocabulary as a one-word sentence: sum_w p(w | segment start, k) = 1
    emitted = [w for w in vocab.itos if vocab.stoi[w] not in (0, 1, 2)]
    data = TextDataset([[w] for w in emitted], vocab)
    lp, _ = model.segment_word_log_probs(data.make_batch(list(range(len(emitted)))))
    torch.testing.assert_close(lp[:, 0, 0].exp().sum(0), torch.ones(3, dtype=torch.float64))


def test_train_evaluate_and_segment_from_the_cli(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "run"
    config = tmp_path / "hsmm.yaml"
    config.write_text(
        "data: {name: tiny}\n"
        "model: {type: neural_hsmm, num_states: 3, max_length: 3, embed_dim: 16, hidden_dim: 16}\n"
        "objective: {type: exact}\n"
        "train: {epochs: 4, batch_size: 16, lr: 0.02, log_every: 5, checkpoint_every: 1000}\n"
        "eval: {batch_size: 32}\n")
    common = ["--data-dir", str(tiny_corpus)]
    assert main(["train", str(config), "--out", str(out), "--quiet", *common]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "test", "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(result["nll"]) and result["ppl"] < 13  # uniform over 12 words + </s> is 13
    assert main(["segment", str(out), "-n", "3", "--json", *common]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert all(1 <= len(text.split()) <= 3 and 0 <= k < 3 for text, k in line["segments"])
