"""One table, one command: train every config of a grid under the same budget, evaluate each
on the test split, and write the comparison table and plots.

    latentlm grid configs/ptb/collapse/*.yaml --seeds 3 --out runs/collapse --jobs 2

Each (config, seed) is a run directory ``OUT/<config stem>/seed<s>`` trained by the one
trainer (so a killed grid resumes: finished rows are skipped, unfinished ones continue from
their last checkpoint) and summarized in ``result.json`` there. The report — ``grid.md``
(mean ± sample standard deviation over seeds, n in the ``seeds`` column), ``grid.json``, ``kl_mi.png`` (KL and MI on the validation split over
training, one line per row) and ``posterior_means.png`` (the posterior means of the test
sentences projected to 2-D by PCA, one panel per row) — is rebuilt from the ``result.json``
files, so ``--report-only`` redraws it without training anything.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from latentlm.errors import ConfigError, LatentLMError

MEANS_SENTENCES = 1000
GRID_START, GRID_END = "<!-- grid:{name}:start -->", "<!-- grid:{name}:end -->"


@dataclass(frozen=True)
class GridJob:
    config: str
    seed: int
    out: str
    overrides: tuple[str, ...]
    test_limit: int | None
    samples: int | None
    precision: str
    gap_sentences: int
    gap_steps: int
    threads: int
    data_dir: str | None = None
    device: str | None = None  # train.device for training and evaluation; None: each config's own


def run_label(config_path: str | Path) -> str:
    """``configs/ptb/collapse/04_free_bits.yaml`` -> ``free bits`` (the row's name in the table)."""
    stem = Path(config_path).stem
    return re.sub(r"^\d+_", "", stem).replace("_", " ")


def run_directory(out: str | Path, config_path: str | Path, seed: int) -> Path:
    return Path(out) / Path(config_path).stem / f"seed{seed}"


def run_job(job: GridJob) -> dict[str, Any]:
    """Train (or resume, or skip) one row and evaluate it; returns and writes ``result.json``."""
    import torch

    from latentlm.config import load_config
    from latentlm.training import train
    from latentlm.io import atomic_write_text

    torch.set_num_threads(job.threads)
    directory = run_directory(job.out, job.config, job.seed)
    result_path = directory / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    device = [f"train.device={job.device}"] if job.device else []
    config = load_config(job.config, [*job.overrides, *device, f"seed={job.seed}"])
    if job.data_dir:
        config.data.data_dir = job.data_dir
    directory.mkdir(parents=True, exist_ok=True)
    resume = (directory / "checkpoints").is_dir() or (directory / "pretrain").is_dir()
    started = time.monotonic()
    summary = train(config, directory, resume=resume, progress=False)
    train_seconds = _training_seconds(directory) or (time.monotonic() - started)
    result = {"config": str(job.config), "label": run_label(job.config), "seed": job.seed,
              "steps": summary["step"], "train_minutes": train_seconds / 60,
              **evaluate_run(directory, job)}
    atomic_write_text(result_path, json.dumps(result, indent=1))
    return result


def _training_seconds(directory: Path) -> float | None:
    """Wall-clock seconds of training from metrics.csv (sums the pretraining stage's too).

    A resumed run restarts its clock, so the elapsed times of each segment (they fall back
    at a resume) are added up.
    """
    total = 0.0
    for path in (directory / "pretrain" / "metrics.csv", directory / "metrics.csv"):
        if path.is_file():
            with path.open(encoding="utf-8") as fh:
                elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(fh) if r.get("elapsed_s")]
            for before, now in zip(elapsed, elapsed[1:] + [-1.0]):
                if now < before:  # the end of a segment
                    total += before
    return total or None


def evaluate_run(directory: Path, job: GridJob) -> dict[str, Any]:
    """Test metrics (IS NLL, PPL, ELBO, KL, MI, AU), the amortization gap on the first
    ``gap_sentences`` test sentences, and the posterior means saved for the 2-D plot."""
    from safetensors.torch import save_file

    from latentlm.device import module_device
    from latentlm.evaluation import evaluate
    from latentlm.evaluation.latent import latent_statistics
    from latentlm.inference.base import GaussianPosterior
    from latentlm.inference.svi import amortization_gap
    from latentlm.system import load_pretrained
    from latentlm.training import load_corpus

    system, config, vocab = load_pretrained(directory, device=job.device)  # None: the run's train.device
    if job.data_dir:
        config.data.data_dir = job.data_dir
    limit = job.test_limit if job.test_limit is not None else config.data.test_limit
    config.data.test_limit = None if limit is None else max(limit, MEANS_SENTENCES)
    _, data = load_corpus(config, vocab, splits=("test",))
    plotted = data["test"]  # the 2-D plot's sentences: at least MEANS_SENTENCES (the encoder alone is cheap)
    test = plotted if limit is None else plotted.head(limit)
    samples = job.samples if job.samples is not None else config.eval.samples
    started = time.monotonic()
    # KL, MI and AU are evaluate()'s (one definition: LatentStatistics), so a row's MI is the
    # number `latentlm evaluate RUN --limit N --precision P` prints for the same run.
    metrics = evaluate(system, test, samples=samples, batch_size=config.eval.batch_size, seed=config.eval.seed,
                       precision=job.precision, beam=config.eval.beam, max_decode_len=config.eval.max_decode_len)
    metrics["eval_minutes"] = (time.monotonic() - started) / 60
    metrics["gap"] = None
    metrics["latent_examples"] = len(test) if metrics["mi"] is not None else None
    posterior = system.posterior
    if posterior is not None:
        _, stats = latent_statistics(system, plotted, config.eval.batch_size, config.eval.seed)
        means = None if stats is None else stats.posterior_means()
        if means is not None:  # the plot only: posterior means of every plotted sentence
            save_file({"means": means.contiguous().cpu()}, str(directory / "test_means.safetensors"))
    if job.gap_sentences and isinstance(posterior, GaussianPosterior):  # the gap refines a diagonal Gaussian
        n = min(job.gap_sentences, len(test))
        device = module_device(system)
        batches = [test.make_batch(list(range(s, min(s + config.eval.batch_size, n)))).to(device)
                   for s in range(0, n, config.eval.batch_size)]
        gap = amortization_gap(system.model, posterior, batches, steps=job.gap_steps, seed=config.eval.seed)
        metrics["gap"] = gap["gap"]
    return metrics


def run_grid(configs: list[str], out: str | Path, seeds: int = 1, jobs: int = 1, threads: int = 1,
             overrides: list[str] | None = None, test_limit: int | None = None, samples: int | None = None,
             precision: str = "bf16-mixed", gap_sentences: int = 100, gap_steps: int = 50,
             data_dir: str | None = None, log=print, device: str | None = None, backend: str = "process",
             address: str | None = None, cpus_per_task: float = 1.0, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (config, seed) — ``jobs`` at a time, each in its own process on ``threads``
    threads (``backend="process"``), or each as a Ray task (``backend="ray"``: a local Ray
    instance, or the cluster at ``address``; ``cpus_per_task`` CPUs reserved per task) — then
    write the table and plots into ``out`` (``latentlm grid`` then adds ``report.html`` /
    ``report.md``, :mod:`latentlm.report.document`); returns the per-run results. A failed row writes ``failed.json`` (its
    error) in its run directory, which the table shows."""
    from tqdm.auto import tqdm

    from latentlm.io import atomic_write_text

    if not configs:
        raise ConfigError("grid: no config files given")
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise ConfigError(f"grid: config file(s) not found: {', '.join(missing)}")
    if backend not in ("process", "ray"):
        raise ConfigError(f"grid: --backend must be 'process' or 'ray', got {backend!r}")
    todo = [GridJob(str(c), s, str(out), tuple(overrides or ()), test_limit, samples, precision, gap_sentences,
                    gap_steps, threads, data_dir, device) for s in range(seeds) for c in configs]  # in the given order: list slow rows first
    results, failed = [], []
    # one bar over every row, with tqdm's ETA; finished rows (skipped on a rerun) count at once
    bar = tqdm(total=len(todo), desc="grid", unit="run", disable=not progress, dynamic_ncols=True)

    def finish(job: GridJob, call) -> None:
        failure = run_directory(job.out, job.config, job.seed) / "failed.json"
        try:
            results.append(_announce(call(), log))
            failure.unlink(missing_ok=True)
        except Exception as err:  # one broken row must not lose the others
            message = f"{type(err).__name__}: {err}"
            failed.append(f"{job.config} seed {job.seed}: {message}")
            failure.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(failure, json.dumps({"config": job.config, "seed": job.seed, "error": message}))
            log(f"[grid] FAILED {failed[-1]}")
        bar.update(1)
        bar.set_postfix(failed=len(failed)) if failed else None

    try:
        if backend == "ray":
            _run_on_ray(todo, finish, address=address, cpus_per_task=cpus_per_task, threads=threads)
        elif jobs <= 1:
            for job in todo:
                finish(job, lambda job=job: run_job(job))
        else:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_job, job): job for job in todo}
                for future in as_completed(futures):
                    finish(futures[future], future.result)
    finally:
        bar.close()
    write_report(out, configs)
    if failed:
        raise GridError(f"{len(failed)} of {len(todo)} grid runs failed (the others are reported; rerun to "
                        f"resume the failed ones):\n  " + "\n  ".join(failed))
    return results


def _run_on_ray(todo: list[GridJob], finish, address: str | None, cpus_per_task: float, threads: int) -> None:
    """Each job a Ray task: a local Ray instance (started and stopped here) unless ``address``
    names a running cluster. Resume is the same as the process pool's: ``run_job`` skips a row
    with ``result.json`` and continues one with checkpoints, so the run folders must be on a
    file system every node sees."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError("grid --backend ray needs Ray: pip install 'latentlm[ray]'") from err
    started_here = not ray.is_initialized()
    if started_here:
        # the driver's LATENTLM_* settings (LATENTLM_DATA, ...) reach every task, on any node
        env = {"OMP_NUM_THREADS": str(threads), **{k: v for k, v in os.environ.items() if k.startswith("LATENTLM_")}}
        kwargs = {"address": address} if address else {"include_dashboard": False}
        ray.init(runtime_env={"env_vars": env}, logging_level="ERROR", log_to_driver=False, **kwargs)
    try:
        task = ray.remote(num_cpus=cpus_per_task, max_retries=0)(run_job)
        pending = {task.remote(job): job for job in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            finish(pending.pop(ref), lambda ref=ref: ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()


class GridError(LatentLMError):
    """Some rows of a grid failed."""


def _announce(result: dict[str, Any], log) -> dict[str, Any]:
    latent = (f"MI {result['mi']:.2f} AU {result['au']} " if result.get("mi") is not None else "")
    log(f"[grid] {result['label']} seed {result['seed']}: NLL {result['nll']:.2f} PPL {result['ppl']:.1f} "
        f"KL {result['kl']:.2f} {latent}({result['train_minutes']:.1f} train-min)")
    return result


# -- the report ---------------------------------------------------------------------------------
COLUMNS = [("nll", "NLL", 2), ("ppl", "PPL", 1), ("neg_elbo", "−ELBO", 2), ("kl", "KL", 2), ("mi", "MI", 2),
           ("au", "AU", 0), ("components_used", "K used by p(z|x)", 0),
           ("q_components_used", "K used by q", 0), ("gap", "amort. gap", 2), ("bleu", "BLEU", 2),
           ("train_minutes", "train min", 1)]


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1), n and the 95 % confidence interval of the mean
    from Student's t with n - 1 degrees of freedom (sd and interval None for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "sd": None, "n": n, "ci95": None}
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci95": [mean - half, mean + half]}


def collect(out: str | Path, configs: list[str]) -> list[dict[str, Any]]:
    """Per config (in sorted order): its label, its runs' results, the runs that failed (their
    ``failed.json``: seed and error) and per column :func:`summarize` over the seeds."""
    from latentlm.training.collapse import collapse_step

    rows = []
    for config in sorted(configs):
        folder = Path(out) / Path(config).stem
        runs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("seed*/result.json"))]
        failures = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("seed*/failed.json"))
                    if not (p.parent / "result.json").is_file()]
        if not runs and not failures:
            continue
        stats = {}
        for run in runs:
            run["neg_elbo"] = -run["elbo"]
            run["collapsed_at"] = collapse_step(read_metrics(folder / f"seed{run['seed']}", "valid"))
        for key, _, _ in COLUMNS:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                stats[key] = summarize(values)
        rows.append({"config": config, "label": run_label(config), "runs": runs, "stats": stats,
                     "failed": failures, "dir": str(folder)})
    return rows


def read_metrics(directory: Path, split: str | None = None) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, in order (only ``split``'s when given); [] without one."""
    path = Path(directory) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if split is None or r["split"] == split]


def principal_plane(means):
    """Centered means (N, D), D >= 2, on their first two principal components: (N, 2) and the
    singular values."""
    import torch

    centered = means - means.mean(0)
    _, s, v = torch.linalg.svd(centered, full_matrices=False)
    return centered @ v[:2].T, s


def format_cell(stat: dict[str, Any] | None, digits: int, interval: bool = True) -> str:
    """``mean ± sd [lo, hi]`` (sd and the 95 % CI only for n > 1); "–" for no value."""
    if stat is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    if stat["sd"] is not None:
        text += f" ± {stat['sd']:.{digits}f}"
        if interval:
            lo, hi = stat["ci95"]
            text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


GOAL_TERM = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*(ref|[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")
SETTINGS = "grid_settings.json"  # the --reference / --goal of the last `latentlm grid` into this folder


def parse_goal(text: str | None) -> list[tuple[str, str, float | None]]:
    """``"kl>=5, mi>=2, au>=10, nll<=ref"`` -> [(key, op, bound)], bound None for ``ref`` (the
    reference row's mean). Keys are the table's columns (nll, ppl, neg_elbo, kl, mi, au, bleu, ...)."""
    terms = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        match = GOAL_TERM.match(part)
        keys = [key for key, _, _ in COLUMNS]
        if match is None or match.group(1) not in keys:
            raise ConfigError(f"grid --goal: cannot read {part.strip()!r}; write terms like 'kl>=5' or 'nll<=ref', "
                              f"comma-separated, with keys from {', '.join(keys)}")
        key, op, bound = match.groups()
        terms.append((key, op, None if bound == "ref" else float(bound)))
    return terms


def row_names(config: str | Path) -> set[str]:
    """What names a grid row on the command line (``--reference``): its label, config stem or path."""
    return {run_label(config), Path(config).stem, str(config)}


def _find_reference(rows: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    for row in rows:
        if reference in row_names(row["config"]):
            return row
    raise ConfigError(f"grid --reference {reference!r}: no such row (rows: "
                      f"{', '.join(Path(r['config']).stem for r in rows)})")


def compare(rows: list[dict[str, Any]], reference: str | None = None,
            goal: str | None = None) -> dict[str, Any] | None:
    """Add to each row ``vs_reference`` (NLL minus the reference row's, paired by seed: the same
    seed is the same data order and initialization draw, so the pairs' spread is what a seed
    changes; :func:`summarize`d) and ``goal`` (whether the row's means meet every ``goal``
    term, and which fail); returns the reference row (None without one, or before any run)."""
    terms = parse_goal(goal)
    if any(bound is None for _, _, bound in terms) and not reference:
        raise ConfigError("grid --goal compares with 'ref' but no --reference row is given")
    ref = _find_reference(rows, reference) if reference and any(r["runs"] for r in rows) else None
    ops = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}
    titles = {key: title for key, title, _ in COLUMNS}
    for row in rows:
        if ref is not None:
            ref_nll = {r["seed"]: r["nll"] for r in ref["runs"]}
            deltas = [r["nll"] - ref_nll[r["seed"]] for r in row["runs"] if r["seed"] in ref_nll]
            row["vs_reference"] = summarize(deltas) if deltas and row is not ref else None
        if not terms or not row["runs"]:
            continue
        if row is ref:
            row["goal"] = "(the reference)"
            continue
        misses = []
        for key, op, bound in terms:
            stat = row["stats"].get(key)
            target = ref["stats"].get(key) if bound is None and ref is not None else None
            limit = bound if bound is not None else (target["mean"] if target else None)
            if stat is None or limit is None:
                misses.append(f"no {titles[key]}")
            elif not ops[op](float(stat["mean"]), float(limit)):
                digits = 3 if round(float(stat["mean"]), 2) == round(float(limit), 2) else 2  # a tie shown apart
                against = f"{ref['label']}'s {limit:.{digits}f}" if bound is None else f"{limit:g}"
                misses.append(f"{titles[key]} {stat['mean']:.{digits}f} not {op} {against}")
        row["goal"] = "yes" if not misses else "no: " + "; ".join(misses)
    return ref


def table(rows: list[dict[str, Any]], reference: str | None = None,
          goal: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The grid's table as a header and body rows (markdown here, HTML in the report): per
    config n, steps, mean ± sample sd [95 % CI] of each column over its seeds, the NLL
    difference to ``reference`` and whether ``goal`` holds (see :func:`compare`), the seeds
    whose run collapsed, and the failed seeds with their error; a column no row has (MI for
    discrete latents, components for continuous ones) is left out."""
    ref = compare(rows, reference, goal)
    columns = [c for c in COLUMNS if any(c[0] in row["stats"] for row in rows)]
    extra = ([f"ΔNLL vs {ref['label']}"] if ref is not None else []) + ([f"goal ({goal})"] if goal else [])
    header = ["row", "n", "steps", *(title for _, title, _ in columns), *extra, "collapsed", "failed"]
    body = []
    for row in rows:
        cells = [format_cell(row["stats"].get(key), digits) for key, _, digits in columns]
        if ref is not None:
            cells.append(format_cell(row.get("vs_reference"), 2) if row.get("vs_reference") else "–")
        if goal:
            cells.append(row.get("goal", "–"))
        steps = "/".join(sorted({str(r["steps"]) for r in row["runs"]})) or "–"
        collapsed = [str(r["seed"]) for r in row["runs"] if r.get("collapsed_at") is not None]
        collapsed_cell = f"{len(collapsed)}/{len(row['runs'])} (seed {', '.join(collapsed)})" if collapsed else "–"
        failed = "; ".join(f"seed {f['seed']}: {f['error']}".replace("|", "/").replace("\n", " ")[:160]
                           for f in row.get("failed", [])) or "–"
        body.append([row["label"], str(len(row["runs"])), steps, *cells, collapsed_cell, failed])
    return header, body


def format_table(rows: list[dict[str, Any]], reference: str | None = None, goal: str | None = None) -> str:
    """:func:`table` as Markdown."""
    header, body = table(rows, reference, goal)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" if h in ("row", "collapsed", "failed") or h.startswith("goal") else "---:"
                               for h in header) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def settings(out: str | Path, reference: str | None = None, goal: str | None = None) -> dict[str, str | None]:
    """The table's ``reference`` and ``goal``: the ones given (saved into ``out``), else the
    ones saved by the last grid into ``out``, so a redraw (``--report-only``, ``latentlm report``)
    keeps them."""
    from latentlm.io import atomic_write_text

    path = Path(out) / SETTINGS
    if reference is None and goal is None:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"reference": None, "goal": None}
    parse_goal(goal)  # a typo fails before any training
    chosen = {"reference": reference, "goal": goal}
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(chosen))
    return chosen


def write_report(out: str | Path, configs: list[str], reference: str | None = None, goal: str | None = None) -> str:
    """``grid.md``, ``grid.json`` and the two plots into ``out``; returns the table (with the
    ``reference`` / ``goal`` columns given, or saved there by the last grid: :func:`settings`)."""
    from latentlm.io import atomic_write_text

    out = Path(out)
    rows = collect(out, configs)
    chosen = settings(out, reference, goal)
    table = format_table(rows, **chosen)
    if not any(row["runs"] for row in rows):
        if rows:
            atomic_write_text(out / "grid.md", table + "\n")
        return table
    first = next(row["runs"][0] for row in rows if row["runs"])
    latent_n = next((r.get("latent_examples") for row in rows for r in row["runs"] if r.get("latent_examples")), None)
    samples = max((r.get("samples") or 0) for row in rows for r in row["runs"])
    how = (f"NLL by importance sampling with {samples} samples (exact for models with a tractable marginal)"
           if samples else "NLL exact (enumeration / dynamic programming)")
    note = (f"Test split: first {first['examples']} sentences, {how}; NLL, −ELBO and KL in nats per sentence; "
            f"mean ± sample standard deviation over the row's n seeds, [95 % confidence interval of the mean, "
            f"Student's t with n − 1 degrees of freedom]; 'collapsed': seeds whose validation showed KL < 0.1 "
            f"and no active unit twice in a row; "
            f"PPL per token incl. </s>; "
            + (f"MI and AU from the encoder over the first {latent_n} test sentences; " if latent_n else "")
            + "amortization gap = ELBO after per-example optimization of q minus the encoder's ELBO."
            + (f" ΔNLL: the row's NLL minus the {chosen['reference']} row's, paired by seed (mean ± sd [95 % CI] of "
               f"the n differences; below 0 is better)." if chosen["reference"] else "")
            + (f" Goal ({chosen['goal']}): checked on the row's means ('ref': the reference row's mean); a "
               f"'no' names each term that fails." if chosen["goal"] else ""))
    atomic_write_text(out / "grid.md", table + "\n\n" + note + "\n")
    atomic_write_text(out / "grid.json", json.dumps([{k: v for k, v in r.items()} for r in rows], indent=1))
    rows = [row for row in rows if row["runs"]]
    plot_training_curves(rows, out / "kl_mi.png")
    plot_posterior_means(rows, out / "posterior_means.png")
    return table


def update_results_file(path: str | Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- grid:NAME:start -->`` and ``<!-- grid:NAME:end -->``
    in ``path`` (appending the marked block if absent)."""
    from latentlm.io import atomic_write_text

    path = Path(path)
    start, end = GRID_START.format(name=name), GRID_END.format(name=name)
    body = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        before, rest = body.split(start, 1)
        body = before + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + ("\n\n" if body else "") + block + "\n"
    atomic_write_text(path, body)


def _validation_curves(directory: Path) -> tuple[list[int], list[float], list[float]]:
    rows = [r for r in read_metrics(directory, "valid") if r.get("kl") and r.get("mi")]
    return [int(r["step"]) for r in rows], [float(r["kl"]) for r in rows], [float(r["mi"]) for r in rows]


def plot_training_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """KL(q(z|x) || p(z)) and I_q(x; z) on the validation split over training, one line per row
    (its first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_mi) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab20")
    drawn = 0
    for i, row in enumerate(rows):
        seed_dir = sorted(Path(row["dir"]).glob("seed*"))
        if not seed_dir:
            continue
        steps, kls, mis = _validation_curves(seed_dir[0])
        if not steps:
            continue
        style = dict(color=cmap(i % 20), marker=".", label=row["label"])
        ax_kl.plot(steps, kls, **style)
        ax_mi.plot(steps, mis, **style)
        drawn += 1
    ax_kl.set(xlabel="training step", ylabel="KL (nats / sentence)", title="KL on validation")
    ax_mi.set(xlabel="training step", ylabel="I_q(x; z) (nats)", title="mutual information on validation")
    ax_kl.set_yscale("symlog", linthresh=0.1)
    if drawn:
        ax_mi.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_posterior_means(rows: list[dict[str, Any]], path: Path, limit: int = 1000) -> None:
    """The posterior means of (up to) ``limit`` test sentences projected on their two principal
    components, one panel per row; a collapsed posterior is a single dot at the origin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file

    panels = []
    for row in rows:
        files = sorted(Path(row["dir"]).glob("seed*/test_means.safetensors"))
        if files:
            panels.append((row["label"], load_file(str(files[0]))["means"][:limit].float()))
    if not panels:
        return
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, means) in zip(axes.flat, panels):
        xy, s = principal_plane(means)
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.5)
        spread = float(s[0] ** 2 / max(1, len(means) - 1))
        ax.set_title(f"{label}\nvar(PC1) = {spread:.3g}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"posterior means of {len(panels[0][1])} test sentences, first two principal components")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
