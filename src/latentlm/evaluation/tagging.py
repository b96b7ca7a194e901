"""E4: scores of induced tags (cluster ids) against gold tags.

* many-to-one: each induced state is labelled with the gold tag it co-occurs with most;
  several states may share a tag. Rises with K, so compare at equal K.
* one-to-one: the best injective map from states to tags (Hungarian algorithm on the
  contingency table, scipy's ``linear_sum_assignment``); unmatched states count as wrong.
* V-measure: harmonic mean of homogeneity and completeness (scikit-learn), label-free.

All take flat or nested sequences of equal total length; padding (-1 or None) is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import v_measure_score


def _flatten(x: Sequence[Any]) -> list:
    if len(x) and isinstance(x[0], (list, tuple, np.ndarray)):
        return [t for s in x for t in s]
    return list(x)


def contingency(predicted: Sequence[Any], gold: Sequence[Any]) -> tuple[np.ndarray, list, list]:
    """Counts (P, G) of (predicted label, gold label) pairs and the two label lists."""
    pred, gold = _flatten(predicted), _flatten(gold)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predicted tags but {len(gold)} gold tags")
    if not pred:
        raise ValueError("no tokens to score")
    p_labels = sorted(set(pred), key=str)
    g_labels = sorted(set(gold), key=str)
    p_index = {p: i for i, p in enumerate(p_labels)}
    g_index = {g: i for i, g in enumerate(g_labels)}
    table = np.zeros((len(p_labels), len(g_labels)), dtype=np.int64)
    np.add.at(table, ([p_index[p] for p in pred], [g_index[g] for g in gold]), 1)
    return table, p_labels, g_labels


def many_to_one(predicted: Sequence[Any], gold: Sequence[Any]) -> float:
    table, _, _ = contingency(predicted, gold)
    return float(table.max(1).sum() / table.sum())


def one_to_one(predicted: Sequence[Any], gold: Sequence[Any]) -> float:
    table, _, _ = contingency(predicted, gold)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def v_measure(predicted: Sequence[Any], gold: Sequence[Any]) -> float:
    pred, gold = _flatten(predicted), _flatten(gold)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predicted tags but {len(gold)} gold tags")
    return float(v_measure_score([str(g) for g in gold], [str(p) for p in pred]))


@dataclass
class TaggingScores:
    many_to_one: float
    one_to_one: float
    v_measure: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def tagging_scores(predicted: Sequence[Any], gold: Sequence[Any]) -> TaggingScores:
    """All three scores at once."""
    n = len(_flatten(gold))
    return TaggingScores(many_to_one(predicted, gold), one_to_one(predicted, gold), v_measure(predicted, gold), n)
