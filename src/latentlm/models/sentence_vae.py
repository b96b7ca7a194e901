"""M4: the sentence VAE (Bowman et al. 2016; He et al. 2019's PTB setting).

z ~ N(0, I); x ~ LSTM decoder that starts from a state computed from z and reads z at
every step. The inference network lives in :mod:`latentlm.inference.posteriors`.
``decoder: cnn`` swaps in a dilated causal CNN (Yang et al. 2017) and ``decoder: bow``
a bag-of-words decoder (every position ~ Cat(softmax(W z + b))), weaker decoders that
are posterior-collapse remedies; ``decoder_options`` go to the decoder's constructor.
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, Normal

from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.models.base import LatentVariableModel
from latentlm.nn.bow import BagOfWordsDecoder
from latentlm.nn.cnn_decoder import DilatedCNNDecoder
from latentlm.nn.decoders import LSTMDecoder, word_dropout

DECODERS = {"lstm": LSTMDecoder, "cnn": DilatedCNNDecoder, "bow": BagOfWordsDecoder}


class SentenceVAE(LatentVariableModel):
    latent = "continuous"
    default_posterior = "gaussian_lstm"

    def __init__(self, vocab_size: int, embed_dim: int = 256, hidden_dim: int = 256,
                 latent_dim: int = 32, num_layers: int = 1, dropout: float = 0.0,
                 word_dropout: float = 0.0, decoder: str = "lstm", decoder_options: dict | None = None):
        super().__init__()
        self.vocab_size, self.latent_dim = vocab_size, latent_dim
        if decoder not in DECODERS:
            raise ConfigError(f"model.decoder {decoder!r} unknown; choose one of {sorted(DECODERS)}")
        try:
            self.decoder = DECODERS[decoder](vocab_size, embed_dim, hidden_dim, latent_dim, num_layers, dropout,
                                             **(decoder_options or {}))
        except TypeError as err:
            raise ConfigError(f"model.decoder_options for {decoder!r}: {err}") from None
        self.word_dropout = word_dropout
        self.register_buffer("_zeros", torch.zeros(latent_dim), persistent=False)

    def prior(self) -> Independent:
        return Independent(Normal(self._zeros, torch.ones_like(self._zeros)), 1)

    def log_likelihood(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) for z (S, B, D): the S samples run as one (S*B)-row batch; (S, B)."""
        S, B = z.shape[:2]
        inputs = batch.inputs
        if self.training:
            inputs = word_dropout(inputs, self.word_dropout)
        states = self.decoder.hidden_states(inputs.repeat(S, 1), z.reshape(S * B, -1))
        return self._score(batch, states, S)

    def _score(self, batch: Batch, states: torch.Tensor, S: int) -> torch.Tensor:
        """log p(x | z) (S, B) from the decoder states (S*B, T, H) of S sample-major copies of the batch."""
        rep = (S, 1)
        ll = self.decoder.token_log_probs(states, batch.targets.repeat(rep), batch.mask.repeat(rep))
        return ll.view(S, batch.size)

    def log_likelihood_of(self, batch: Batch):
        """In inference, the LSTM decoder's work on x is done once for all draws of z
        (:meth:`LSTMDecoder.states_for_latents`); otherwise :meth:`log_likelihood` per call."""
        dec = self.decoder
        if not (isinstance(dec, LSTMDecoder) and dec.shares_inputs()):
            return super().log_likelihood_of(batch)
        states_of = dec.states_for_latents(batch.inputs)
        return lambda z: self._score(batch, states_of(z), z.size(0))

    @torch.no_grad()
    def generate(self, z, num, max_len=50, greedy=False, generator=None):
        if z is None:
            z = self.prior().sample((num,))
        return self.decoder.generate(z, num, max_len, greedy, generator)
