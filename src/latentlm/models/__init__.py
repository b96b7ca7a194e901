"""Generative models p(x, z). ``MODELS`` maps a config's ``model.type`` to a class."""

from latentlm.models.alignment import AttentionTranslator
from latentlm.models.base import LatentVariableModel
from latentlm.models.bow_vae import BagOfWordsVAE
from latentlm.models.factorial_hmm import FactorialHMM
from latentlm.models.hmm import HMM
from latentlm.models.hsmm import NeuralHSMM
from latentlm.models.lstm_lm import LSTMLanguageModel
from latentlm.models.lstm_tag_chain import LSTMTagChain
from latentlm.models.nb_mixture import NaiveBayesMixture
from latentlm.models.neural_hmm import NeuralHMM
from latentlm.models.rnn_mixture import MixtureOfRNNLMs
from latentlm.models.sentence_vae import SentenceVAE
from latentlm.models.topic_model import NeuralTopicModel

MODELS: dict[str, type[LatentVariableModel]] = {
    "lstm_lm": LSTMLanguageModel,
    "sentence_vae": SentenceVAE,
    "bow_vae": BagOfWordsVAE,
    "topic_model": NeuralTopicModel,
    "rnn_mixture": MixtureOfRNNLMs,
    "nb_mixture": NaiveBayesMixture,
    "hmm": HMM,
    "neural_hmm": NeuralHMM,
    "factorial_hmm": FactorialHMM,
    "neural_hsmm": NeuralHSMM,
    "lstm_tag_chain": LSTMTagChain,
    "attention_translator": AttentionTranslator,
}

__all__ = ["BagOfWordsVAE", "LatentVariableModel", "LSTMLanguageModel", "SentenceVAE", "MixtureOfRNNLMs",
           "NaiveBayesMixture", "HMM", "NeuralHMM", "FactorialHMM", "NeuralHSMM", "LSTMTagChain", "NeuralTopicModel",
           "AttentionTranslator",
           "MODELS"]
