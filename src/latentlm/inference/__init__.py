"""Posteriors q(z | x) and learning objectives, independent of the model."""

from latentlm.inference.base import (FlowPosterior, GaussianPosterior, Objective, ObjectiveOutput, Posterior,
                                     StructuredPosterior)
from latentlm.inference.elbo import ELBO, IWAE, VIMCO
from latentlm.inference.exact import ExactMarginal
from latentlm.inference.local import AlignmentPosterior, LocalELBO
from latentlm.inference.mean_field import AmortizedMeanField, FactorialChains, MeanField, structured_mean_field
from latentlm.inference.kl import free_bits, kl_per_dimension
from latentlm.inference.posteriors import POSTERIORS, GaussianLSTMPosterior, diagonal_gaussian
from latentlm.inference.semi_amortized import SemiAmortizedELBO
from latentlm.inference.svi import StochasticVI, amortization_gap
from latentlm.inference.schedules import ConstantSchedule, CyclicalSchedule, LinearSchedule, make_schedule

OBJECTIVES: dict[str, type[Objective]] = {
    "exact": ExactMarginal,
    "elbo": ELBO,
    "iwae": IWAE,
    "sa_elbo": SemiAmortizedELBO,
    "svi": StochasticVI,
    "vimco": VIMCO,
    "mean_field": MeanField,
    "amortized_mean_field": AmortizedMeanField,
    "local_elbo": LocalELBO,
}

__all__ = [
    "Objective", "ObjectiveOutput", "Posterior", "GaussianPosterior", "FlowPosterior", "StructuredPosterior", "ELBO", "IWAE", "VIMCO", "ExactMarginal", "free_bits",
    "kl_per_dimension", "POSTERIORS", "GaussianLSTMPosterior", "diagonal_gaussian", "ConstantSchedule",
    "CyclicalSchedule", "LinearSchedule", "make_schedule", "OBJECTIVES", "SemiAmortizedELBO", "StochasticVI",
    "amortization_gap", "MeanField", "AmortizedMeanField", "FactorialChains", "structured_mean_field",
    "LocalELBO", "AlignmentPosterior",
]
