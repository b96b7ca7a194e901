"""Weaker decoders (dilated CNN, bag of words), M3 the bag-of-words VAE, and L3 per-instance SVI."""

import pytest
import scipy.sparse as sp
import torch

from latentlm.data import TextDataset, Vocab
from latentlm.data.documents import BowBatch, to_torch_csr
from latentlm.errors import ConfigError
from latentlm.inference import ELBO, POSTERIORS, StochasticVI, amortization_gap
from latentlm.inference.posteriors import GaussianLSTMPosterior
from latentlm.inference.svi import PerInstanceGaussian
from latentlm.models import BagOfWordsVAE, SentenceVAE
from latentlm.nn.bow import bag_of_words
from latentlm.nn.cnn_decoder import DilatedCNNDecoder

SENTS = [["a", "b", "c"], ["b", "b"], ["c", "a", "a", "b"], ["a"], ["c", "c", "b", "a", "c"], ["b", "a"]]


@pytest.fixture
def data():
    vocab = Vocab.build(SENTS)
    dataset = TextDataset(SENTS, vocab)
    return vocab, dataset, dataset.make_batch(range(len(SENTS)))


def test_cnn_decoder_is_causal_and_sees_its_receptive_field():
    torch.manual_seed(0)
    dec = DilatedCNNDecoder(10, embed_dim=4, hidden_dim=6, latent_dim=2, kernel_size=2, dilations=(1, 2)).eval()
    assert dec.receptive_field == 4
    x = torch.randint(4, 10, (1, 9))
    z = torch.randn(1, 2)
    base = dec.hidden_states(x, z)
    for t in range(9):
        y = x.clone()
        y[0, t] = 3 if x[0, t] != 3 else 4
        changed = (dec.hidden_states(y, z) - base).abs().sum(-1)[0] > 1e-6  # (T,)
        assert not changed[:t].any()  # the past never sees the future
        assert changed[t : t + dec.receptive_field].all()  # and t is seen for a receptive field
        assert not changed[t + dec.receptive_field :].any()


@pytest.mark.parametrize("decoder", ["lstm", "cnn", "bow"])
def test_sentence_vae_decoder_options(data, decoder):
    vocab, _, batch = data
    torch.manual_seed(0)
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=3, decoder=decoder,
                        decoder_options={"dilations": [1, 2]} if decoder == "cnn" else None)
    posterior = GaussianLSTMPosterior(len(vocab), 3, embed_dim=8, hidden_dim=8)
    z = torch.randn(2, batch.size, 3)
    ll = model.log_likelihood(batch, z)
    assert ll.shape == (2, batch.size) and (ll < 0).all()
    out = ELBO()(model, posterior, batch)
    out.loss.backward()
    assert model.decoder.out.weight.grad is not None
    gen = model.generate(None, 4, max_len=12, generator=torch.Generator().manual_seed(0))
    assert gen.shape[0] == 4 and gen.shape[1] <= 12


def test_bow_decoder_scores_the_order_free_unigram_likelihood(data):
    vocab, _, batch = data
    torch.manual_seed(0)
    model = SentenceVAE(len(vocab), hidden_dim=0, latent_dim=3, decoder="bow")
    z = torch.randn(2, batch.size, 3)
    counts = bag_of_words(batch, len(vocab))
    assert counts.sum(1).tolist() == batch.lengths.tolist()  # words + </s>
    expected = model.decoder.log_likelihood_counts(counts, z)
    torch.testing.assert_close(model.log_likelihood(batch, z), expected)
    shuffled = batch.tokens.clone()
    shuffled[0, 1:4] = shuffled[0, 1:4].flip(0)  # reorder the words of sentence 0
    batch2 = type(batch)(shuffled, batch.lengths, batch.index)
    torch.testing.assert_close(model.log_likelihood(batch2, z), expected)


def test_unknown_decoder_is_a_config_error(data):
    with pytest.raises(ConfigError, match="model.decoder 'gru' unknown"):
        SentenceVAE(10, decoder="gru")
    with pytest.raises(ConfigError, match="decoder_options"):
        SentenceVAE(10, decoder="cnn", decoder_options={"kernel": 3})


def test_bow_vae_reads_token_batches_and_document_counts_alike_and_learns(data):
    vocab, dataset, batch = data
    torch.manual_seed(0)
    model = BagOfWordsVAE(len(vocab), latent_dim=2)
    posterior = POSTERIORS["gaussian_bow"](len(vocab), 2, hidden_dim=16)
    counts = bag_of_words(batch, len(vocab))
    docs = BowBatch(to_torch_csr(sp.csr_matrix(counts.numpy())), batch.lengths, batch.index)
    z = torch.randn(3, batch.size, 2)
    torch.testing.assert_close(model.log_likelihood(docs, z), model.log_likelihood(batch, z))
    torch.testing.assert_close(posterior.params(docs)[0], posterior.params(batch)[0])
    objective = ELBO()
    opt = torch.optim.Adam([*model.parameters(), *posterior.parameters()], lr=0.05)
    torch.manual_seed(1)
    first = None
    for _ in range(60):
        out = objective(model, posterior, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.bound.mean().detach())
    assert float(out.bound.mean().detach()) > first + 1.0
    assert model.top_words(2).shape == (2, 2)
    assert model.generate(None, 3, max_len=8).shape[0] == 3


def test_svi_optimizes_the_local_table_and_evaluates_from_the_prior(data):
    vocab, dataset, batch = data
    torch.manual_seed(0)
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=2)
    posterior = POSTERIORS["per_instance_gaussian"](latent_dim=2, num_examples=len(dataset))
    objective = StochasticVI(steps=5, lr=0.5, eval_steps=10)
    out = objective(model, posterior, batch)
    out.loss.backward()
    assert model.decoder.out.weight.grad is not None
    assert float(posterior.mean.abs().sum()) > 0  # the batch's rows were optimized and stored
    with pytest.raises(ValueError, match="num_examples"):
        posterior.params(type(batch)(batch.tokens, batch.lengths, batch.index + 100))
    objective.eval()
    q = objective.evaluation_posterior(model, posterior, type(batch)(batch.tokens, batch.lengths, batch.index + 100))
    assert q.mean.shape == (batch.size, 2)


def test_amortization_gap_is_non_negative(data):
    vocab, dataset, _ = data
    torch.manual_seed(0)
    model = SentenceVAE(len(vocab), embed_dim=8, hidden_dim=8, latent_dim=2)
    with torch.no_grad():
        model.decoder.z_to_state.weight.mul_(5)
    posterior = GaussianLSTMPosterior(len(vocab), 2, embed_dim=8, hidden_dim=8)
    gap = amortization_gap(model, posterior, dataset.batches(3), steps=30, lr=0.3, samples=4, eval_samples=200)
    assert gap["optimized_elbo"] > gap["encoder_elbo"]
    assert gap["gap"] == pytest.approx(gap["optimized_elbo"] - gap["encoder_elbo"])
    assert isinstance(posterior, torch.nn.Module) and not isinstance(posterior, PerInstanceGaussian)


def test_topic_model_mixes_topic_distributions_and_learns(data):
    from latentlm.models import NeuralTopicModel

    vocab, _, batch = data
    torch.manual_seed(0)
    model = NeuralTopicModel(len(vocab), num_topics=3, latent_dim=2)
    z = torch.randn(2, batch.size, 2)
    probs = model.word_log_probs(z).exp()  # (S, B, V): a mixture of distributions is one
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, batch.size))
    theta = torch.softmax(model.to_theta(z[0, 0]), -1)
    torch.testing.assert_close(probs[0, 0], theta @ model.topics().exp())
    posterior = POSTERIORS["gaussian_bow"](len(vocab), 2, hidden_dim=16)
    opt = torch.optim.Adam([*model.parameters(), *posterior.parameters()], lr=0.05)
    first = None
    for _ in range(40):
        out = ELBO()(model, posterior, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.bound.mean().detach())
    assert float(out.bound.mean().detach()) > first + 1.0
    assert model.top_words(2).shape == (3, 2)


def test_npmi_by_hand():
    from latentlm.models.topic_model import npmi_coherence

    docs = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]])
    scores = npmi_coherence(torch.tensor([[0, 1], [0, 2], [2, 3]]), docs)
    # words 0,1 always together: NPMI 1; 0 and 2 never together: -1;
    # 2,3: p(2)=1/2, p(3)=1/4, p(2,3)=1/4 -> log(2) / log(4) = 0.5
    torch.testing.assert_close(scores, torch.tensor([1.0, -1.0, 0.5]))


def _random_documents(n_docs: int = 6, vocab_size: int = 14, seed: int = 0):
    import numpy as np

    from latentlm.data.documents import BagOfWords
    from latentlm.data.vocab import SPECIALS

    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.8, size=(n_docs, vocab_size)).astype(np.float32)
    counts[:, : len(SPECIALS)] = 0  # specials never occur in documents
    counts[1] = 0  # an empty document scores 0
    counts[2, -1] = 40  # and a long one
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    return sp.csr_matrix(counts), BagOfWords(sp.csr_matrix(counts), Vocab(list(SPECIALS) + words))


@pytest.mark.parametrize("chunk_elements", [None, 50])
def test_topic_model_scores_documents_at_their_observed_words_exactly(data, chunk_elements):
    """The observed-words likelihood of a BowBatch (sparse or dense counts) is the dense
    sum_w n_w log p(w | z), value and gradient, whether or not it chunks the samples."""
    from latentlm.models import NeuralTopicModel

    counts, bow = _random_documents()
    torch.manual_seed(0)
    model = NeuralTopicModel(counts.shape[1], num_topics=4, latent_dim=3)
    if chunk_elements is not None:
        model.chunk_elements = chunk_elements  # 1 sample per chunk here
    with torch.no_grad():
        model.topic_logits.normal_(0, 3.0)  # peaked, distinct topics
    z = torch.randn(5, counts.shape[0], 3)
    dense_counts = torch.from_numpy(counts.toarray())
    expected = (model.word_log_probs(z) * dense_counts).sum(-1)  # (S, B), the dense formula
    grads = torch.autograd.grad(expected.sum(), [model.topic_logits, model.to_theta.weight])
    for batch in (bow.batch(), bow.batch(sparse=False)):
        got = model.log_likelihood(batch, z)
        torch.testing.assert_close(got, expected)
        assert (got[:, 1] == 0).all()
        for g, e in zip(torch.autograd.grad(got.sum(), [model.topic_logits, model.to_theta.weight]), grads):
            torch.testing.assert_close(g, e)
    # token batches keep the dense path: their counts (words + </s>) give the same numbers
    _, _, tokens = data
    model = NeuralTopicModel(len(data[0]), num_topics=3, latent_dim=2)
    z = torch.randn(2, tokens.size, 2)
    token_counts = bag_of_words(tokens, len(data[0]))
    docs = BowBatch(to_torch_csr(sp.csr_matrix(token_counts.numpy())), tokens.lengths, tokens.index)
    torch.testing.assert_close(model.log_likelihood(docs, z), model.log_likelihood(tokens, z))


@pytest.mark.parametrize("per_document", [False, True])
def test_topic_init_from_documents_gives_distinct_normalized_data_topics(per_document):
    from latentlm.models import NeuralTopicModel

    counts, _ = _random_documents(n_docs=30, vocab_size=20)
    model = NeuralTopicModel(20, num_topics=5, latent_dim=3)
    model.init_topics_from_documents(counts, docs_per_topic=2, seed=0, per_document=per_document)
    beta = model.topics().exp()
    torch.testing.assert_close(beta.sum(-1), torch.ones(5))
    torch.testing.assert_close(model.topic_logits.exp().sum(-1), torch.ones(5))  # logits are log-probs
    assert (beta[:, :4] < 1e-3).all()  # never-seen words keep only the smoothing mass
    distance = (beta[:, None, :] - beta[None, :, :]).abs().sum(-1)  # (K, K) L1
    assert (distance + torch.eye(5) > 0.05).all()  # pairwise distinct
    same = NeuralTopicModel(20, num_topics=5, latent_dim=3)
    same.init_topics_from_documents(counts, docs_per_topic=2, seed=0, per_document=per_document)
    torch.testing.assert_close(same.topic_logits, model.topic_logits)  # seeded


def test_bow_posterior_bound_and_dropout_options():
    counts, bow = _random_documents()
    counts = sp.csr_matrix(counts.multiply(500.0))  # far longer documents than it was built for
    batch = BowBatch(to_torch_csr(counts), bow.batch().lengths * 500, bow.batch().index)
    torch.manual_seed(0)
    plain = POSTERIORS["gaussian_bow"](counts.shape[1], 4, hidden_dim=16)
    torch.manual_seed(0)
    unbounded = POSTERIORS["gaussian_bow"](counts.shape[1], 4, hidden_dim=16, bound=None)
    torch.manual_seed(0)
    bounded = POSTERIORS["gaussian_bow"](counts.shape[1], 4, hidden_dim=16, bound=[0.5, 0.25])
    assert plain.state_dict().keys() == bounded.state_dict().keys()  # no new parameters
    with torch.no_grad():
        for module in (plain, unbounded, bounded):
            module.to_params.weight.mul_(20.0)  # outputs well beyond the bounds
    for a, b in zip(plain.params(batch), unbounded.params(batch)):
        torch.testing.assert_close(a, b)
    mean, logvar = plain.params(batch)
    assert mean.abs().max() > 0.5 and logvar.abs().max() > 0.25
    b_mean, b_logvar = bounded.params(batch)
    assert b_mean.abs().max() <= 0.5 and b_logvar.abs().max() <= 0.25  # (tanh saturates to 1 in fp32)
    torch.testing.assert_close(b_mean, 0.5 * torch.tanh(mean / 0.5))
    torch.testing.assert_close(b_logvar, 0.25 * torch.tanh(logvar / 0.25))
    torch.manual_seed(0)
    dropped = POSTERIORS["gaussian_bow"](counts.shape[1], 4, hidden_dim=16, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    torch.testing.assert_close(dropped.eval().params(batch)[0], mean)  # evaluation: no dropout
    assert not torch.allclose(dropped.train().params(batch)[0], mean)
    with pytest.raises(ValueError, match="bound"):
        POSTERIORS["gaussian_bow"](10, 2, bound=(1.0, 0.0))


def test_npmi_of_a_scipy_matrix_equals_the_dense_one():
    from latentlm.models.topic_model import npmi_coherence

    counts, _ = _random_documents(n_docs=40, vocab_size=20)
    top = torch.tensor([[5, 6, 7], [19, 8, 6], [10, 11, 12]])
    torch.testing.assert_close(npmi_coherence(top, counts), npmi_coherence(top, torch.from_numpy(counts.toarray())))
