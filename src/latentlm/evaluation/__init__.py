"""Evaluation: likelihood bounds, latent usage, generation."""

from latentlm.evaluation.evaluate import evaluate
from latentlm.evaluation.generation import encode_means, interpolate, reconstruct, sample_sentences
from latentlm.evaluation.latent import active_units, gaussian_log_density, mutual_information
from latentlm.evaluation.likelihood import importance_sampled_log_marginal, perplexity

__all__ = ["evaluate", "encode_means", "interpolate", "reconstruct", "sample_sentences", "active_units",
           "gaussian_log_density", "mutual_information", "importance_sampled_log_marginal", "perplexity"]
