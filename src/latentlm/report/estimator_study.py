"""The estimator study (issue 4, SPEC L5): bias, variance and cost of every gradient estimator
for a discrete latent, measured against the exact gradient on one fixed batch.

For a trained model with a small categorical z (M2, K components) the ELBO's gradient with
respect to the inference network phi is computable exactly by enumerating the K components
(``ELBO(estimator="enumerate")``). Each estimator is run ``draws`` times on the same batch;
its gradients g_1..g_N (flattened over every parameter of q) give

- ``bias`` = ||mean(g) - exact||, next to ``bias_floor`` = sqrt(trace(Cov g) / N), the
  distance an *unbiased* estimator's mean would still be from the exact gradient because of
  Monte Carlo noise alone: a bias well above the floor is real. Since
  E||mean - exact||^2 = ||E g - exact||^2 + trace(Cov g) / N, ``bias_excess`` =
  sqrt(max(0, bias^2 - bias_floor^2)) estimates the true bias with the noise taken out;
- ``variance`` = trace(Cov g) = E||g - E g||^2, the total variance;
- ``cosine`` between mean(g) and the exact gradient;
- ``ms_per_draw``, the wall-clock cost of one draw (objective + backward to phi).

VIMCO optimizes a different bound (IWAE-S), so its row is compared with the exact gradient of
that bound, computed by enumerating all K^S sample tuples.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentlm.data.batching import Batch, TextDataset
from latentlm.data.corpus import find_corpus, read_lines, split_path
from latentlm.inference import OBJECTIVES
from latentlm.inference.base import Objective
from latentlm.inference.elbo import ELBO
from latentlm.inference.estimators import Enumeration
from latentlm.models.base import FiniteLatentModel

#: Every estimator of issue 4. A spec is an ``objective`` config section; ``warmup`` (not an
#: objective argument) is how many steps train the estimator's own state on the batch before
#: measuring: the moving average's buffer, the learned baseline's network.
DEFAULT_ESTIMATORS: dict[str, dict[str, Any]] = {
    "enumerate": {"type": "elbo", "estimator": "enumerate"},
    "score_function": {"type": "elbo", "estimator": {"type": "score_function", "baseline": "none"}},
    "sf_moving_average": {"type": "elbo", "estimator": {"type": "score_function", "baseline": "moving_average"},
                          "warmup": 50},
    "sf_learned": {"type": "elbo", "estimator": {"type": "score_function", "baseline": "learned"},
                   "warmup": 1000},
    "sf_leave_one_out": {"type": "elbo", "estimator": {"type": "score_function", "baseline": "leave_one_out"}},
    "gumbel_tau1": {"type": "elbo", "estimator": {"type": "gumbel", "temperature": 1.0, "min_temperature": 1.0}},
    "gumbel_tau0.5": {"type": "elbo", "estimator": {"type": "gumbel", "temperature": 0.5, "min_temperature": 0.5}},
    "gumbel_tau0.1": {"type": "elbo", "estimator": {"type": "gumbel", "temperature": 0.1, "min_temperature": 0.1}},
    "straight_through": {"type": "elbo", "estimator": {"type": "straight_through", "temperature": 1.0,
                                                        "min_temperature": 1.0}},
    "vimco": {"type": "vimco"},
}

ROW_KEYS = ("estimator", "target", "samples", "draws", "warmup", "bias", "bias_floor", "bias_excess", "relative_bias",
            "variance", "cosine", "exact_norm", "ms_per_draw")

_MAX_TUPLES = 200_000  # K^S sample tuples enumerated for the exact IWAE-S gradient


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No weight gradients for ``module`` (the generative model): only q's are measured, and
    skipping the decoder's weight gradients makes each draw several times cheaper. Gradients
    still flow *through* it to a relaxed z."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _flat_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]).double()


def exact_elbo_gradient(model, posterior, batch: Batch) -> torch.Tensor:
    """d mean_b ELBO_b / d phi, flattened (P,): E_q enumerated over the K components, closed-form KL."""
    params = [p for p in posterior.parameters() if p.requires_grad]
    return _flat_grad(ELBO(estimator="enumerate")(model, posterior, batch).bound.mean(), params)


def exact_iwae_gradient(model, posterior, batch: Batch, samples: int) -> torch.Tensor:
    """d mean_b E[IWAE_S bound_b] / d phi, flattened (P,), by summing over all K^S tuples of z."""
    q, prior = posterior(batch), model.prior()
    K = q.logits.size(-1)
    if K ** samples > _MAX_TUPLES:
        raise ValueError(f"exact IWAE gradient enumerates K^S = {K}^{samples} tuples, more than {_MAX_TUPLES}")
    log_q = q.logits.T.log_softmax(0)                                   # (K, B)
    with torch.no_grad():
        ll = model.log_likelihood_all(batch)                            # (K, B)
    log_w = ll + prior.logits.log_softmax(-1)[:, None] - log_q          # (K, B)
    tuples = torch.tensor(list(itertools.product(range(K), repeat=samples)), device=log_w.device)  # (K^S, S)
    bound = torch.logsumexp(log_w[tuples], 1) - math.log(samples)       # (K^S, B)
    weight = log_q[tuples].sum(1).exp()                                 # (K^S, B) prob. of each tuple
    params = [p for p in posterior.parameters() if p.requires_grad]
    return _flat_grad((weight * bound).sum(0).mean(), params)


def _warm_up(objective: Objective, model, posterior, batch: Batch, steps: int, lr: float = 0.01) -> None:
    """Train the estimator's own state on the batch, as training would have: moving averages
    update in train mode; a learned baseline's parameters follow its squared-error loss."""
    own = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(own, lr=lr) if own else None
    objective.train()
    for step in range(steps):
        if optimizer is None:
            with torch.no_grad():
                objective(model, posterior, batch, step)
            continue
        out = objective(model, posterior, batch, step)
        optimizer.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(out.loss, own)  # the baseline's loss alone moves the baseline
        for p, g in zip(own, grads):
            p.grad = g
        optimizer.step()


def _measure(objective: Objective, model, posterior, batch: Batch, params: list[nn.Parameter],
             draws: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean gradient (P,), total variance, seconds per draw. Sums are shifted by the first draw,
    so a deterministic estimator gets exactly zero variance."""
    first = total = sq = None
    start = time.perf_counter()
    for _ in range(draws):
        g = _flat_grad(-objective(model, posterior, batch).loss, params)  # the estimator's gradient of the bound
        if first is None:
            first, total, sq = g, torch.zeros_like(g), torch.zeros_like(g)
        d = g - first
        total += d
        sq += d * d
    seconds = (time.perf_counter() - start) / draws
    mean = first + total / draws
    variance = float(((sq - total * total / draws) / max(1, draws - 1)).clamp(min=0).sum())
    return mean, variance, seconds


def estimator_study(system, batch: Batch, estimators: dict[str, Any] | None = None, draws: int = 200,
                    samples: int = 4, seed: int = 0, vocab_size: int | None = None,
                    progress: bool = False) -> list[dict[str, Any]]:
    """One row per estimator (keys ``ROW_KEYS``) on ``batch`` of a trained discrete-latent system.

    ``estimators`` maps a name to an objective spec (an ``objective`` config section, e.g.
    ``{"type": "elbo", "estimator": "straight_through"}``, or a bare estimator spec for the
    ELBO), default :data:`DEFAULT_ESTIMATORS`; specs without ``samples`` draw ``samples``
    z's per sentence, so all estimators see the same number of decoder evaluations. The model
    and q are put in eval mode (no dropout), so the exact gradient is one fixed vector.
    """
    model, posterior = system.model, system.posterior
    if posterior is None or not isinstance(model, FiniteLatentModel):
        raise ValueError(f"the estimator study needs a posterior and a model with log_likelihood_all "
                         f"(a small categorical z), got {type(model).__name__}")
    if vocab_size is None:  # only a learned baseline needs it (its bag-of-words embedding)
        vocab_size = int(batch.tokens.max()) + 1
    was_training = system.training
    system.eval()
    params = [p for p in posterior.parameters() if p.requires_grad]
    rows = []
    try:
        with _frozen(model):
            exact = {"elbo": exact_elbo_gradient(model, posterior, batch)}
            for name, spec in (estimators or DEFAULT_ESTIMATORS).items():
                spec = dict(spec) if isinstance(spec, dict) and spec.get("type") in OBJECTIVES else \
                    {"type": "elbo", "estimator": spec}
                warmup = int(spec.pop("warmup", 0))
                spec.setdefault("samples", samples)
                kind = spec.pop("type")
                objective = OBJECTIVES[kind](**spec, **({"vocab_size": vocab_size} if kind == "elbo" else {}))
                S = objective.samples
                if kind == "vimco":
                    target = f"iwae{S}"
                    if target not in exact:
                        exact[target] = exact_iwae_gradient(model, posterior, batch, S)
                else:
                    target = "elbo"
                torch.manual_seed(seed)
                _warm_up(objective, model, posterior, batch, warmup)
                objective.eval()  # measure with the warmed-up state held fixed
                mean, variance, seconds = _measure(objective, model, posterior, batch, params, draws)
                ref = exact[target]
                bias = float((mean - ref).norm())
                rows.append({
                    "estimator": name, "target": target,
                    "samples": 0 if isinstance(getattr(objective, "estimator", None), Enumeration) else S,
                    "draws": draws, "warmup": warmup, "bias": bias,
                    "bias_floor": math.sqrt(variance / draws),
                    "bias_excess": math.sqrt(max(0.0, bias ** 2 - variance / draws)), "relative_bias": bias / max(float(ref.norm()), 1e-30),
                    "variance": variance,
                    "cosine": float(torch.nn.functional.cosine_similarity(mean, ref, dim=0)),
                    "exact_norm": float(ref.norm()), "ms_per_draw": 1000 * seconds,
                })
                if progress:
                    print(_format_row(rows[-1]), flush=True)
    finally:
        system.train(was_training)
    return rows


# -- reporting ----------------------------------------------------------------------------------

_HEADER = ("| estimator | target | S | bias ‖mean − exact‖ | noise floor √(tr Σ / N) | excess √(bias² − floor²) "
           "| bias / ‖exact‖ | variance tr Σ | cosine | ms / draw |")


def _format_row(r: dict[str, Any]) -> str:
    return (f"| {r['estimator']} | {r['target']} | {r['samples']} | {r['bias']:.3g} | {r['bias_floor']:.3g} "
            f"| {r['bias_excess']:.3g} | {r['relative_bias']:.3g} | {r['variance']:.3g} | {r['cosine']:.3f} | {r['ms_per_draw']:.0f} |")


def study_table(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    return "\n".join([_HEADER, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
                     + [_format_row(r) for r in rows]) + "\n"


#: The file the study writes into its output folder and ``latentlm report`` looks for (in a
#: folder given to it, in its subfolders, in a run folder and that run's subfolders).
STUDY_FILE = "estimator_study.json"


def write_study(rows: list[dict[str, Any]], out_dir: str | Path, name: str = "estimator_study") -> dict[str, Path]:
    """Write ``<name>.table.md`` (the Markdown table), ``<name>.json`` (the rows; with the default
    name, :data:`STUDY_FILE`, which ``latentlm report`` reads) and ``<name>.png`` (log-scale bias
    and variance per estimator, :func:`plot_study`) into ``out_dir``; returns the paths."""
    import json

    from latentlm.io import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / f"{name}.table.md", "json": out / f"{name}.json", "plot": out / f"{name}.png"}
    atomic_write_text(paths["table"], study_table(rows))
    atomic_write_text(paths["json"], json.dumps(rows, indent=2))
    atomic_write_bytes(paths["plot"], plot_study(rows, dpi=120))
    return paths


def read_study(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a :data:`STUDY_FILE`; ``ValueError`` naming the file when it is not one
    (not JSON, not a list of rows with ``estimator``, ``bias``, ``bias_floor``, ``bias_excess``,
    ``variance``)."""
    import json

    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable as an estimator study ({err})") from err
    needed = ("estimator", "bias", "bias_floor", "bias_excess", "variance")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and all(k in r for k in needed)
                                                          for r in rows):
        raise ValueError(f"{path}: not an estimator study (a non-empty list of rows with {', '.join(needed)})")
    return rows


def plot_study(rows: list[dict[str, Any]], dpi: int = 90) -> bytes:
    """PNG of two log-scale bar panels, one bar per estimator: the bias ‖mean − exact‖ (with
    its Monte Carlo noise floor and the excess over it marked) and the gradient variance tr Σ.
    A zero (enumeration is exact) is drawn as a grey stub a decade below the smallest value."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["estimator"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, key, label in ((axes[0], "bias", "bias ‖mean − exact‖"), (axes[1], "variance", "variance tr Σ")):
        keys = (key, "bias_floor", "bias_excess") if key == "bias" else (key,)
        positive = [r[k] for r in rows for k in keys if r[k] > 0]
        tiny = min(positive, default=1.0) / 10  # a zero (enumeration) cannot sit on a log axis
        values = [max(r[key], tiny) for r in rows]
        ax.barh(names, values, color=["tab:gray" if r[key] <= 0 else "tab:blue" for r in rows])
        for name, r in zip(names, rows):
            if r[key] <= 0:
                ax.annotate(" 0 (exact)", (tiny, name), va="center", fontsize=8)
        if key == "bias":
            ax.scatter([max(r["bias_floor"], tiny) for r in rows], names, marker="|", s=200, color="black",
                       label="noise floor √(tr Σ / N)", zorder=3)
            ax.scatter([max(r["bias_excess"], tiny) for r in rows], names, marker="o", s=25, color="tab:orange",
                       label="excess √(bias² − floor²)", zorder=4)
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle("Gradient estimators vs the exact gradient w.r.t. q's parameters (one fixed batch)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


# -- from a trained run ---------------------------------------------------------------------------

def study_batch(dataset: TextDataset, batch_size: int, seed: int) -> Batch:
    """A fixed batch of ``batch_size`` sentences drawn with ``seed`` from ``dataset``."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.make_batch(sorted(order[:batch_size].tolist()))


def run_estimator_study(run_dir: str | Path, out_dir: str | Path, batch_size: int = 16, draws: int = 200,
                        samples: int = 4, seed: int = 0, estimators: dict[str, Any] | None = None,
                        data_dir: str | None = None, progress: bool = False,
                        posterior: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Load a trained run, take ``batch_size`` sentences of its valid split, run the study and
    write table, JSON and plot into ``out_dir``. Backs ``latentlm bench estimators DIR``.

    A run trained on the exact marginal has no q: ``posterior`` (a ``posterior`` config
    section, e.g. ``{"type": "categorical_lstm"}``) then builds a fresh one (seeded), i.e.
    the study is of the first steps of amortized inference on a model whose components are
    in use — where the gradients are not the near-zero ones of a collapsed q.
    """
    from latentlm.system import build_posterior, load_pretrained

    system, config, vocab = load_pretrained(run_dir)
    if system.posterior is None or posterior is not None:
        torch.manual_seed(seed)
        system.posterior = build_posterior(posterior or {"type": "categorical_lstm"}, system.model, len(vocab))
    d = config.data
    folder = find_corpus(d.name, data_dir or d.data_dir)
    valid = TextDataset(read_lines(split_path(folder, "valid"), d.max_tokens, d.valid_limit).lines, vocab)
    batch = study_batch(valid, batch_size, seed)
    rows = estimator_study(system, batch, estimators, draws=draws, samples=samples, seed=seed,
                           vocab_size=len(vocab), progress=progress)
    write_study(rows, out_dir)
    return rows


__all__ = ["DEFAULT_ESTIMATORS", "ROW_KEYS", "STUDY_FILE", "estimator_study", "exact_elbo_gradient",
           "exact_iwae_gradient", "plot_study", "read_study", "run_estimator_study", "study_batch", "study_table",
           "write_study"]
