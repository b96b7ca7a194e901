"""Exact dynamic programs over chains and segmentations: log-partition, marginals, Viterbi,
sampling, entropy.

The fast kernels (``chain_*``, ``hmm_*``, ``crf_*``, ``LinearChainCRF``) are tested against
:class:`ReferenceChain`, one plain semiring recursion (log, max, sample, entropy, KL) that is
also what they differentiate when a gradient must be differentiated again. The semi-Markov
kernels (``semimarkov_*``) are tested against :class:`ReferenceSemiMarkov`, the same semirings
over segments.
"""

from latentlm.structured.chain import (
    chain_entropy,
    chain_log_partition,
    chain_marginals,
    chain_sample,
    chain_score,
    chain_viterbi,
    crf_entropy,
    crf_log_partition,
    crf_marginals,
    crf_sample,
    crf_score,
    crf_viterbi,
    emission_scores,
    hmm_entropy,
    hmm_log_likelihood,
    hmm_marginals,
    hmm_sample,
    hmm_viterbi,
)
from latentlm.structured.crf import LinearChainCRF
from latentlm.structured.reference import (
    EntropySemiring,
    KLSemiring,
    LogSemiring,
    MaxSemiring,
    ReferenceChain,
    SampleSemiring,
    Semiring,
    chain_semiring_dp,
)
from latentlm.structured.semimarkov import (
    semimarkov_log_partition,
    semimarkov_marginals,
    semimarkov_position_marginals,
    semimarkov_sample,
    semimarkov_score,
    semimarkov_viterbi,
)
from latentlm.structured.semimarkov_reference import ReferenceSemiMarkov, semimarkov_semiring_dp

__all__ = [
    "emission_scores", "hmm_log_likelihood", "hmm_marginals", "hmm_viterbi", "hmm_sample", "hmm_entropy",
    "crf_log_partition", "crf_marginals", "crf_viterbi", "crf_sample", "crf_entropy", "crf_score",
    "chain_log_partition", "chain_marginals", "chain_viterbi", "chain_sample", "chain_entropy",
    "chain_score", "LinearChainCRF",
    "ReferenceChain", "chain_semiring_dp", "Semiring", "LogSemiring", "MaxSemiring", "SampleSemiring",
    "EntropySemiring", "KLSemiring",
    "semimarkov_log_partition", "semimarkov_marginals", "semimarkov_position_marginals", "semimarkov_viterbi",
    "semimarkov_sample", "semimarkov_score", "ReferenceSemiMarkov", "semimarkov_semiring_dp",
]
