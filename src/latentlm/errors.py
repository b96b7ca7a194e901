"""Errors a user can act on. The CLI prints these as one message, never a traceback."""


class LatentLMError(Exception):
    """Base class for every error latentlm raises on purpose."""


class CorpusError(LatentLMError, ValueError):
    """A corpus file is missing, empty, not UTF-8, or has a malformed line."""


class ConfigError(LatentLMError, ValueError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(LatentLMError, ValueError):
    """A checkpoint directory is missing files or does not match the config."""


class TrainingDivergedError(LatentLMError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
