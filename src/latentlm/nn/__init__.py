"""Reusable neural blocks."""

from latentlm.nn.decoders import LSTMDecoder, word_dropout
from latentlm.nn.encoders import LSTMEncoder

__all__ = ["LSTMDecoder", "LSTMEncoder", "word_dropout"]
