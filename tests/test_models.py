import math

import pytest
import torch
import torch.nn.functional as F

from latentlm.data import TextDataset, Vocab
from latentlm.models import LSTMLanguageModel, SentenceVAE


def test_lstm_lm_nll_equals_hand_computed_sum():
    torch.manual_seed(0)
    sents = [["a", "b", "c"], ["c", "a"]]
    vocab = Vocab.build(sents)
    model = LSTMLanguageModel(len(vocab), embed_dim=5, hidden_dim=6).eval()
    batch = TextDataset(sents, vocab).make_batch([0, 1])
    with torch.no_grad():
        got = model.log_marginal(batch)
    lstm, emb, out = model.decoder.lstm, model.decoder.embed, model.decoder.out
    for row, sent in enumerate(sents):
        assert math.isclose(float(got[row]), _by_hand(sent, vocab, lstm, emb, out), rel_tol=1e-5)


@torch.no_grad()
def _by_hand(sent, vocab, lstm, emb, out) -> float:
    """Step an LSTM cell by its textbook equations and add up log-softmax scores."""
    ids = [vocab.bos_id, *vocab.encode(sent), vocab.eos_id]
    h = c = torch.zeros(lstm.hidden_size)
    total = 0.0
    for prev, nxt in zip(ids[:-1], ids[1:]):
        gates = lstm.weight_ih_l0 @ emb.weight[prev] + lstm.bias_ih_l0 + lstm.weight_hh_l0 @ h + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        total += float(F.log_softmax(out.weight @ h + out.bias, -1)[nxt])
    return total


def test_vae_samples_share_one_batched_pass_and_match_per_sample():
    torch.manual_seed(0)
    sents = [["a", "b"], ["b", "a", "a"]]
    vocab = Vocab.build(sents)
    model = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=5, latent_dim=3).eval()
    batch = TextDataset(sents, vocab).make_batch([0, 1])
    z = torch.randn(4, 2, 3)
    joint = model.log_likelihood(batch, z)
    one_by_one = torch.stack([model.log_likelihood(batch, z[s : s + 1])[0] for s in range(4)])
    torch.testing.assert_close(joint, one_by_one)
    assert joint.shape == (4, 2)


def test_word_dropout_only_in_training():
    torch.manual_seed(0)
    sents = [["a", "b", "c", "a", "b", "c"]] * 4
    vocab = Vocab.build(sents)
    model = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=5, latent_dim=2, word_dropout=1.0)
    batch = TextDataset(sents, vocab).make_batch(range(4))
    z = torch.zeros(1, 4, 2)
    model.eval()
    a = model.log_likelihood(batch, z)
    model.train()
    b = model.log_likelihood(batch, z)  # every input word is <unk> now
    assert not torch.allclose(a, b)
    model.word_dropout = 0.0
    torch.testing.assert_close(model.log_likelihood(batch, z), a)


def test_generation_ends_and_is_reproducible():
    torch.manual_seed(0)
    vocab = Vocab.build([["a", "b"]])
    model = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=5, latent_dim=2).eval()
    z = torch.zeros(3, 2)
    a = model.generate(z, 3, max_len=7, generator=torch.Generator().manual_seed(1))
    b = model.generate(z, 3, max_len=7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape[1] <= 7
    assert not ((a == vocab.bos_id) | (a == vocab.pad_id) & (torch.arange(a.size(1)) == 0)).any()


def test_fused_output_layer_matches_log_softmax_and_its_gradients():
    from latentlm.nn.output import linear_log_softmax_gather

    torch.manual_seed(0)
    M, H, V = 600, 16, 700  # more rows than one block
    h = torch.randn(M, H, requires_grad=True)
    w = (0.3 * torch.randn(V, H)).requires_grad_()
    b = torch.randn(V, requires_grad=True)
    t, g = torch.randint(0, V, (M,)), torch.randn(M)
    ref = -F.cross_entropy(h @ w.T + b, t, reduction="none")
    ref_grads = torch.autograd.grad((ref * g).sum(), (h, w, b))
    out = linear_log_softmax_gather(h, w, b, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, c in zip(torch.autograd.grad((out * g).sum(), (h, w, b)), ref_grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 products, fp32 normalizer
        low = linear_log_softmax_gather(h, w, b, t)
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.1
    for a, c in zip(torch.autograd.grad((low * g).sum(), (h, w, b)), ref_grads):
        assert (a - c).abs().max() < 0.05 * c.abs().max()


def test_inference_log_probs_match_the_training_path():
    torch.manual_seed(0)
    vocab = Vocab.build([["a", "b", "c"]])
    model = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=5, latent_dim=2).eval()
    batch = TextDataset([["a", "b"], ["c", "a", "b", "b"]], vocab).make_batch([0, 1])
    z = torch.randn(3, 2, 2)
    model.decoder.INFERENCE_BLOCK_ROWS = {torch.float32: (4, 2), torch.bfloat16: (4, 2)}  # several blocks, a ragged last one
    with torch.enable_grad():
        train_path = model.log_likelihood(batch, z)
    with torch.no_grad():
        infer_path = model.log_likelihood(batch, z)
    torch.testing.assert_close(infer_path, train_path.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_inference_layer_scores_every_call_like_the_training_path(dtype):
    """Inside ``frozen_parameters`` the W^T copy and the logits buffer have rows padded to
    ALIGN_BYTES (V = 7 here: 9 pad columns in fp32); the buffer's -inf padding must survive
    each block's in-place normalizer, or the next call's normalizers would count it."""
    from latentlm.nn.output import ALIGN_BYTES, frozen_parameters, transposed_weights

    torch.manual_seed(0)
    vocab = Vocab.build([["a", "b", "c"]])
    model = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=5, latent_dim=2).eval()
    batch = TextDataset([["a", "b"], ["c", "a", "b", "b"]], vocab).make_batch([0, 1])
    model.decoder.INFERENCE_BLOCK_ROWS = {torch.float32: (4, 2), torch.bfloat16: (4, 2)}
    with frozen_parameters(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        w_t = transposed_weights(model.decoder.out.weight, model.decoder.out.bias, dtype)[0]
        assert w_t.stride(1) == 1 and (w_t.stride(0) * w_t.element_size()) % ALIGN_BYTES == 0
        torch.testing.assert_close(w_t.float(), model.decoder.out.weight.t().to(dtype).float(), rtol=0, atol=0)
        for seed in range(3):  # the buffer carries over from call to call
            z = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                infer_path = model.log_likelihood(batch, z)
            with torch.enable_grad(), torch.autocast("cpu", enabled=False):
                train_path = model.log_likelihood(batch, z).detach()
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(infer_path, train_path, rtol=tol, atol=tol)
            buf = model.decoder._logits_buffer
            assert (buf[:, len(vocab):] == -math.inf).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_states_for_many_latents_equal_the_repeated_batch(dtype):
    """The inference recurrence (x's input product once, (i, f, o, g) gates, tanh through the
    sigmoid) gives the same states as nn.LSTM over the S-times repeated batch, and importance
    sampling's per-batch scorer the same log p(x | z) as log_likelihood."""
    torch.manual_seed(0)
    vocab = Vocab.build([["a", "b", "c", "d"]])
    model = SentenceVAE(len(vocab), embed_dim=6, hidden_dim=5, latent_dim=3).eval()
    with torch.no_grad():
        model.decoder.lstm.bias_hh_l0.normal_()  # both biases count
    batch = TextDataset([["a", "b"], ["c", "a", "d", "b"], ["d"]], vocab).make_batch([0, 1, 2])
    z = torch.randn(4, 3, 3)
    on = dtype == torch.bfloat16
    with torch.no_grad():
        expected = model.decoder.hidden_states(batch.inputs.repeat(4, 1), z.reshape(12, 3))
        expected_ll = model.log_likelihood(batch, z)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            got = model.decoder.states_for_latents(batch.inputs)(z)
            got_ll = model.log_likelihood_of(batch)(z)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(got_ll, expected_ll, rtol=0, atol=1e-5 if not on else 0.1)
    model.train()  # training (dropout, autograd) keeps nn.LSTM
    with pytest.raises(RuntimeError, match="inference path"):
        model.decoder.states_for_latents(batch.inputs)
    assert model.log_likelihood_of(batch).func == model.log_likelihood


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_normalizer_redoes_rows_outside_the_unshifted_range(dtype):
    """The inference path sums exp(logits) without the row max; rows whose logits would overflow
    (or all underflow) are recomputed with the shift, so every row matches log_softmax."""
    torch.manual_seed(0)
    decoder = SentenceVAE(50, embed_dim=4, hidden_dim=8, latent_dim=2).decoder
    decoder.INFERENCE_BLOCK_ROWS = {torch.float32: (4, 2), torch.bfloat16: (4, 2)}
    flat = torch.randn(11, 8)
    flat[[1, 6, 7]] *= 400.0                          # logits in the hundreds: exp overflows
    tgt = torch.randint(0, 50, (11,))
    with torch.no_grad():
        decoder.out.bias[:] = torch.randn(50)
        shifted = decoder.out.bias.clone()
        for bias in (shifted, shifted - 101.0, shifted - 300.0):  # then exp subnormal, then 0
            decoder.out.bias.copy_(bias)
            logits = flat.double() @ decoder.out.weight.double().t() + bias.double()
            expected = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                got = decoder._inference_log_probs(flat, tgt)
            assert torch.isfinite(got).all()
            scale = 1.0 + logits.abs().amax(1)  # bf16 rounds each logit to 2^-8 of its size
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert ((got.double() - expected).abs() / scale).max() < tol


def test_bf16_inference_sees_a_fused_optimizer_step():
    """Fused Adam updates parameters without bumping their version counters: the bf16 copy
    of the output layer must still follow each step (it once froze at the first validation
    of a bf16 training run), and is reused only inside one ``frozen_parameters`` block."""
    from latentlm.nn.output import frozen_parameters, transposed_weights

    torch.manual_seed(0)
    vocab = Vocab.build([["a", "b", "c"]])
    model = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=5, latent_dim=2)
    batch = TextDataset([["a", "b"], ["c", "a", "b", "b"]], vocab).make_batch([0, 1])
    z = torch.randn(3, 2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)

    def scored():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.log_likelihood(batch, z)

    with frozen_parameters():
        before = scored()
        weight, bias = model.decoder.out.weight, model.decoder.out.bias
        copy = transposed_weights(weight, bias, torch.bfloat16)[0]
        assert torch.equal(scored(), before) and transposed_weights(weight, bias, torch.bfloat16)[0] is copy  # reused
    assert transposed_weights(weight, bias, torch.bfloat16)[0] is not copy  # and dropped after the block
    version = model.decoder.out.weight._version
    model.log_likelihood(batch, z).sum().neg().backward()
    optimizer.step()
    assert model.decoder.out.weight._version == version  # why the version cannot be the key
    with frozen_parameters():
        after = scored()
    fresh = SentenceVAE(len(vocab), embed_dim=4, hidden_dim=5, latent_dim=2)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fresh.log_likelihood(batch, z)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_equal_length_batches_take_the_unpacked_path_with_the_same_numbers():
    """A batch of equal lengths skips packing (encoder) and the mask gather/scatter (decoder);
    the values and gradients equal those of the same rows inside a padded batch."""
    from latentlm.data.batching import Batch
    from latentlm.nn.encoders import LSTMEncoder

    torch.manual_seed(0)
    V, B, T = 30, 3, 5
    enc, vae = LSTMEncoder(V, 8, 8), SentenceVAE(V, 8, 8, 4)
    tokens = torch.randint(4, V, (B, T + 1))
    tokens[:, 0], tokens[:, -1] = Vocab.bos_id, Vocab.eos_id
    equal = Batch(tokens, torch.full((B,), T), torch.arange(B))
    # the same rows padded by one longer sentence
    longer = torch.cat([tokens[:1, :-1], torch.randint(4, V, (1, 2)), tokens[:1, -1:]], 1)
    padded = Batch(torch.cat([F.pad(tokens, (0, 2)), longer]), torch.tensor([T] * B + [T + 2]), torch.arange(B + 1))
    z = torch.randn(2, B + 1, 4)
    h_eq, h_pad = enc(equal.tokens, equal.lengths), enc(padded.tokens, padded.lengths)[:B]
    assert torch.allclose(h_eq, h_pad, atol=1e-6)
    vae.eval()
    ll_eq = vae.log_likelihood(equal, z[:, :B])
    ll_pad = vae.log_likelihood(padded, z)[:, :B]
    assert torch.allclose(ll_eq, ll_pad, atol=1e-5)
    vae.train()
    vae.decoder.dropout.p = 0.0
    g_eq = torch.autograd.grad(vae.log_likelihood(equal, z[:, :B]).sum(), vae.decoder.out.weight)[0]
    g_pad = torch.autograd.grad(vae.log_likelihood(padded, z)[:, :B].sum(), vae.decoder.out.weight)[0]
    assert torch.allclose(g_eq, g_pad, atol=1e-5)


@pytest.mark.parametrize("shift", [0.0, -101.0, -300.0])
def test_fused_output_layer_redoes_rows_outside_the_unshifted_range(shift):
    """Rows whose exp(logits) overflow (x 300), go subnormal (-101) or all underflow (-300) are
    redone with the row max in the forward, and the backward's softmax uses each row's own shift."""
    from latentlm.nn.output import linear_log_softmax_gather

    torch.manual_seed(0)
    M, H, V = 300, 16, 90  # more rows than one block
    scale = torch.ones(M, 1)
    scale[[3, 280]] = 300.0
    h = (torch.randn(M, H) * scale).requires_grad_()
    w = (0.3 * torch.randn(V, H)).requires_grad_()
    b = (torch.randn(V) + shift).requires_grad_()
    t, g = torch.randint(0, V, (M,)), torch.randn(M)
    ref = -F.cross_entropy(h.double() @ w.double().T + b.double(), t, reduction="none")
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (h, w, b))
    out = linear_log_softmax_gather(h, w, b, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    for a, c in zip(torch.autograd.grad((out * g).sum(), (h, w, b)), ref_grads):
        torch.testing.assert_close(a.double(), c.double(), rtol=1e-4, atol=1e-4)


def test_decoder_without_output_bias_agrees_on_every_path():
    """``decoder_options: {output_bias: false}`` (He et al.'s decoder): the training path
    (plain fp32 and fused bf16), the inference path and their gradients agree."""
    from latentlm.nn.output import linear_log_softmax_gather

    torch.manual_seed(0)
    V, B = 40, 4
    vae = SentenceVAE(V, 8, 8, 4, decoder_options={"output_bias": False})
    assert vae.decoder.out.bias is None
    ds = TextDataset([["a", "b"], ["c"], ["a", "c", "b"], ["b", "b"]], Vocab(["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c"]))
    batch = ds.make_batch([0, 1, 2, 3])
    z = torch.randn(2, B, 4)
    vae.eval()
    with torch.no_grad():
        inference = vae.log_likelihood(batch, z)
    train = vae.log_likelihood(batch, z)
    torch.testing.assert_close(inference, train.detach(), rtol=1e-5, atol=1e-5)
    h = torch.randn(50, 8, requires_grad=True)
    t = torch.randint(0, V, (50,))
    w = vae.decoder.out.weight
    ref = -F.cross_entropy(h @ w.T, t, reduction="none")
    fused = linear_log_softmax_gather(h, w, None, t)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, c in zip(torch.autograd.grad(fused.sum(), (h, w)), torch.autograd.grad(ref.sum(), (h, w))):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = vae.log_likelihood(batch, z)
    assert (low - inference).abs().max() < 0.1
