"""latentlm: deep latent variable models of natural language.

The public surface, re-exported explicitly; subpackages hold the rest
(``latentlm.data``, ``nn``, ``structured``, ``models``, ``inference``, ``evaluation``,
``training``).
"""

from latentlm.config import Config, load_config
from latentlm.errors import CheckpointError, ConfigError, CorpusError, LatentLMError, TrainingDivergedError
from latentlm.evaluation import evaluate
from latentlm.system import System, build_system, load_pretrained
from latentlm.training import train

__version__ = "0.1.0"

__all__ = [
    "Config", "load_config", "train", "evaluate", "System", "build_system", "load_pretrained",
    "LatentLMError", "CorpusError", "ConfigError", "CheckpointError", "TrainingDivergedError", "__version__",
]
