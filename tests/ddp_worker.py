"""`latentlm train` with the reparameterization noise pinned to zero (z = the posterior mean).

Each data-parallel rank draws its own noise by design, so a sentence VAE trained on 2 ranks
can equal the 1-process run only where nothing is sampled; the equivalence test runs both
through this entry point (tests/test_distributed.py)."""

import sys

import torch
from torch.distributions import Normal


def _mean(self, sample_shape=torch.Size()):
    return self.loc.expand(self._extended_shape(sample_shape))


Normal.rsample = _mean

if __name__ == "__main__":
    from latentlm.cli.main import main

    sys.exit(main(sys.argv[1:]))
