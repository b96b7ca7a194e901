"""L1: exact marginal likelihood, maximized by direct gradient ascent."""

from __future__ import annotations

from latentlm.inference.base import Objective, ObjectiveOutput


class ExactMarginal(Objective):
    """loss = -mean log p(x); for models with a tractable marginal (LM, mixtures, HMMs)."""

    needs_posterior = False

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        if not model.has_exact_marginal:
            raise ValueError(f"{type(model).__name__} has no exact log p(x); use an 'elbo' or 'iwae' objective")
        log_px = model.log_marginal(batch)  # (B,)
        return ObjectiveOutput(loss=-log_px.mean(), bound=log_px, log_marginal=log_px, tokens=batch.lengths)
