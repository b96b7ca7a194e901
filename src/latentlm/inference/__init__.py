"""Posteriors q(z | x) and learning objectives, independent of the model."""

from latentlm.inference.base import Objective, ObjectiveOutput, Posterior
from latentlm.inference.elbo import ELBO, IWAE
from latentlm.inference.exact import ExactMarginal
from latentlm.inference.kl import free_bits, kl_per_dimension
from latentlm.inference.posteriors import POSTERIORS, GaussianLSTMPosterior, diagonal_gaussian
from latentlm.inference.schedules import ConstantSchedule, CyclicalSchedule, LinearSchedule, make_schedule

OBJECTIVES: dict[str, type[Objective]] = {
    "exact": ExactMarginal,
    "elbo": ELBO,
    "iwae": IWAE,
}

__all__ = [
    "Objective", "ObjectiveOutput", "Posterior", "ELBO", "IWAE", "ExactMarginal", "free_bits",
    "kl_per_dimension", "POSTERIORS", "GaussianLSTMPosterior", "diagonal_gaussian", "ConstantSchedule",
    "CyclicalSchedule", "LinearSchedule", "make_schedule", "OBJECTIVES",
]
