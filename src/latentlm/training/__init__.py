"""The training engine: one loop for every model and objective."""

from latentlm.io import atomic_write_text
from latentlm.training.checkpoint import latest_checkpoint, save_checkpoint
from latentlm.training.run import train
from latentlm.training.trainer import Trainer, autocast, load_corpus, validate

__all__ = ["Trainer", "autocast", "load_corpus", "train", "validate", "atomic_write_text",
           "save_checkpoint", "latest_checkpoint"]
