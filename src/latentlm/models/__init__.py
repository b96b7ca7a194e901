"""Generative models p(x, z). ``MODELS`` maps a config's ``model.type`` to a class."""

from latentlm.models.base import LatentVariableModel
from latentlm.models.lstm_lm import LSTMLanguageModel
from latentlm.models.sentence_vae import SentenceVAE

MODELS: dict[str, type[LatentVariableModel]] = {
    "lstm_lm": LSTMLanguageModel,
    "sentence_vae": SentenceVAE,
}

__all__ = ["LatentVariableModel", "LSTMLanguageModel", "SentenceVAE", "MODELS"]
