"""``latentlm report RUN_OR_GRID_DIR... [--out DIR]``: one page about trained runs.

Writes ``report.md`` (figures beside it in ``figures/``) and ``report.html``, which is
self-contained: every figure is a PNG inside the page as a ``data:`` URI, the style is
inline, there is no script and nothing is fetched from a network.

* A grid folder (``latentlm grid --out``: ``<config>/seed<s>/``) gets its table — each metric
  as mean ± sample sd over seeds, the 95 % confidence interval of the mean (Student's t) and n,
  collapsed and failed seeds — and then a section per run.
* A run folder (``config.json`` inside) gets its section; a folder of run folders (``make
  demo``'s) a section for each.

A run's section: its last validation, its test result when a grid evaluated it, the
training curves from ``metrics.csv`` (training loss; validation −ELBO, KL, MI, AU against
the step), a mark when the posterior collapsed (the trainer's rule,
:mod:`latentlm.training.collapse`), the 2-D posterior-mean plot for a Gaussian code, samples,
reconstructions and interpolations for a sentence VAE, state → top-words tables for
HMMs and mixtures, then under "Figures" every PNG the run wrote into its own ``figures/``
folder (e.g. a model's alignment heatmaps, ``figures/alignment_*.png``), captioned by file
stem (other files there, e.g. ``*.json``, are listed, not rendered), and any estimator study
found in the run folder or its subfolders.

* An estimator study (``estimator_study.json``, which ``latentlm bench estimators --out DIR``
  writes; :mod:`latentlm.report.estimator_study`) in a folder given, or in one of its
  subfolders, gets a section: each estimator's gradient bias and variance as log-scale bars,
  and the table.

``report.html`` and ``report.md`` may be written into a run folder (``latentlm report RUN``
does by default), so the report's own figures may land in that run's ``figures/``: the
report lists what it wrote there in ``figures/.latentlm-report.json`` and never shows those
files as the run's figures.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError

REPORT_FIGURES = ".latentlm-report.json"  # in figures/: the files a report wrote there (not the run's)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEANS_SENTENCES = 1000  # sentences of the 2-D posterior-mean plot when the run has no saved means
TEXT_EXAMPLES = 4       # samples and reconstructions per sentence VAE
TOP_WORDS = 10


# -- a report is a list of blocks, rendered to Markdown and to HTML ------------------------------
@dataclass
class Figure:
    name: str   # file stem in figures/
    png: bytes
    alt: str
    source: Path | None = None  # a file the figure was read from: linked, not copied, when already in figures/


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str, mark: str | None = None) -> None:
        self.blocks.append(("heading", (level, text, mark)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", Table(header, rows)))

    def figure(self, name: str, png: bytes, alt: str, source: Path | None = None) -> None:
        self.blocks.append(("figure", Figure(name, png, alt, source)))

    def markdown(self, figures_dir: Path, prefix: str = "figures") -> str:
        """The Markdown text; writes the figures into ``figures_dir`` and records their names in
        its :data:`REPORT_FIGURES` (with those of earlier reports still there)."""
        from latentlm.io import atomic_write_bytes, atomic_write_text

        parts, written = [], set()
        for kind, value in self.blocks:
            if kind == "heading":
                level, text, mark = value
                parts.append("#" * level + " " + text + (f" — **{mark}**" if mark else ""))
            elif kind == "text":
                parts.append(value)
            elif kind == "table":
                parts.append("\n".join(["| " + " | ".join(_md_cell(c) for c in value.header) + " |",
                                        "| " + " | ".join("---" for _ in value.header) + " |",
                                        *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in value.rows)]))
            elif kind == "figure":
                if value.source is not None and value.source.parent.resolve() == figures_dir.resolve():
                    file = value.source.name  # a run's own figure, and the report is written into that run
                else:
                    file = f"{value.name}.png"
                    atomic_write_bytes(figures_dir / file, value.png)
                    written.add(file)
                parts.append(f"![{_md_alt(value.alt)}]({prefix}/{file})")
        if written:
            written |= {name for name in report_written(figures_dir) if (figures_dir / name).is_file()}
            atomic_write_text(figures_dir / REPORT_FIGURES, json.dumps(sorted(written), indent=0))
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.blocks:
            if kind == "heading":
                level, text, mark = value
                badge = f' <span class="mark">{html.escape(mark)}</span>' if mark else ""
                body.append(f"<h{level}>{html.escape(text)}{badge}</h{level}>")
            elif kind == "text":
                body.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in value.header)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                               for row in value.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "figure":
                data = base64.b64encode(value.png).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(value.alt)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(value.alt)}</figcaption></figure>")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{border:1px solid #d0d0d0;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.mark{background:#b3261e;color:#fff;border-radius:4px;padding:.1em .5em;font-size:.7em;vertical-align:middle}
p{max-width:60em}
"""


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_alt(text: str) -> str:
    return text.replace("[", "(").replace("]", ")").replace("\n", " ")


def report_written(figures_dir: Path) -> set[str]:
    """Names of the files reports wrote into ``figures_dir`` (its :data:`REPORT_FIGURES`)."""
    try:
        names = json.loads((Path(figures_dir) / REPORT_FIGURES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


# -- what is in a folder --------------------------------------------------------------------------
def _is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _grid_rows(folder: Path) -> list[str]:
    """Config stems of a grid folder (``<stem>/seed<s>/`` holding a run, a result or a failure)."""
    stems = {p.parent.parent.name for pattern in ("*/seed*/config.json", "*/seed*/result.json", "*/seed*/failed.json")
             for p in folder.glob(pattern)}
    return sorted(stems)


def build_report(sources: list[str | Path], out: str | Path) -> Path:
    """Write ``report.md``, ``figures/`` and ``report.html`` about ``sources`` into ``out``;
    returns the path of ``report.html``."""
    from latentlm.io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    report.heading(1, "latentlm report")
    report.text("Sources: " + ", ".join(str(Path(s)) for s in sources) + ". NLL, −ELBO and KL in nats per "
                "example; MI = I_q(x; z) in nats; AU = active units (Cov_x E_q[z_d | x] > 0.01).")
    seen = 0
    for source in map(Path, sources):
        if not source.is_dir():
            raise LatentLMError(f"report: {source} is not a folder (give run or grid folders)")
        if _is_run(source):
            _run_section(report, source, source.name or str(source), level=2)
            seen += 1
        elif stems := _grid_rows(source):
            _grid_section(report, source, stems)
            seen += 1
        else:
            runs = sorted(p.parent for p in source.glob("*/config.json"))
            for run in runs:
                _run_section(report, run, run.name, level=2)
            studies = [p for p in _study_files(source) if not _is_run(p.parent)]  # a run's: in its section
            for study in studies:
                _study_section(report, study, source, level=2)
            seen += bool(runs or studies)
            if not runs and not studies:
                report.text(f"{source}: no runs found (no config.json, no <config>/seed<s>/ folders, "
                            f"no estimator study).")
    if not seen:
        raise LatentLMError("report: none of " + ", ".join(map(str, sources)) + " holds a run, a grid or an "
                            "estimator study")
    atomic_write_text(out / "report.md", report.markdown(out / "figures"))
    page = out / "report.html"
    atomic_write_text(page, report.html("latentlm report"))
    return page


def _grid_section(report: Report, folder: Path, stems: list[str]) -> None:
    from latentlm.report.grid import collect, settings, table

    rows = collect(folder, stems)
    chosen = settings(folder)
    report.heading(2, f"Grid {folder.name}")
    report.text("Each cell: mean ± sample standard deviation over the row's n seeds, then the 95 % confidence "
                "interval of the mean [Student's t, n − 1 degrees of freedom]; test split as evaluated by "
                "`latentlm grid` (see grid.md there for the protocol)."
                + (f" ΔNLL: minus the {chosen['reference']} row's NLL, paired by seed." if chosen["reference"] else "")
                + (f" Goal: {chosen['goal']}, on the means." if chosen["goal"] else ""))
    report.table(*table(rows, **chosen))
    for row in rows:
        for run in sorted(Path(row["dir"]).glob("seed*")):
            if _is_run(run):
                _run_section(report, run, f"{row['label']} · {run.name}", level=3)


# -- one run ----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "run"


def _run_section(report: Report, run: Path, title: str, level: int) -> None:
    from latentlm.report.grid import read_metrics
    from latentlm.training.collapse import collapse_step

    rows = read_metrics(run)
    valid = [r for r in rows if r["split"] == "valid"]
    collapsed = collapse_step(valid)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    model = (config.get("model") or {}).get("type", "?")
    report.heading(level, title, mark=f"posterior collapsed (step {collapsed})" if collapsed is not None else None)
    report.text(f"{run} — model {model}, objective {(config.get('objective') or {}).get('type', '?')}, "
                f"posterior {(config.get('posterior') or {}).get('type') or 'none'}.")
    latent = bool(config.get("posterior"))  # no q: KL, MI and AU do not apply ("—", no panels)
    keys = ("nll", "kl", "mi", "au") if latent else ("nll",)
    summary = []
    if valid:
        last = valid[-1]
        summary.append(["validation (last)", last["step"], *(_fmt(last.get(k)) for k in keys)])
    result = run / "result.json"
    if result.is_file():
        r = json.loads(result.read_text(encoding="utf-8"))
        summary.append([f"test ({r.get('examples', '?')} examples)", str(r.get("steps", "")),
                        *(_fmt(r.get(k)) for k in keys)])
    if summary:
        report.table(["split", "step", "NLL (or −ELBO)", *(("KL", "MI", "AU") if latent else ())], summary)
    slug = _slug("_".join(run.resolve().parts[-2:]))
    if rows:
        png = plot_curves(rows if latent else [{**r, "kl": "", "mi": "", "au": ""} for r in rows], title)
        if png:
            report.figure(f"{slug}_curves", png, f"{title}: training loss and validation −ELBO, KL, MI, AU vs step")
    try:
        _model_sections(report, run, title, slug, level + 1)
    except (LatentLMError, OSError) as err:  # the curves stand without the model (e.g. data not here)
        report.text(f"Model-based sections skipped: {err}")
    _run_figures(report, run, slug, level + 1)
    for study in _study_files(run):
        _study_section(report, study, run, level + 1)


def _run_figures(report: Report, run: Path, slug: str, level: int) -> None:
    """Every PNG the run wrote into ``figures/`` (not those a report wrote there), in name
    order, captioned by file stem; the other files there are listed."""
    folder = run / "figures"
    if not folder.is_dir():
        return
    ours = report_written(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in ours and not p.name.startswith("."))
    pngs = [p for p in files if p.suffix.lower() == ".png"]
    if not files:
        return
    report.heading(level, "Figures")
    unreadable = []
    for path in pngs:
        png = path.read_bytes()
        if not png.startswith(PNG_SIGNATURE):
            unreadable.append(path.name)
            continue
        report.figure(f"{slug}_figure_{_slug(path.stem)}", png, path.stem, source=path)
    if unreadable:
        report.text("Not PNG images (skipped): " + ", ".join(unreadable) + ".")
    if others := [p.name for p in files if p.suffix.lower() != ".png"]:
        report.text(f"Other files in {folder}: " + ", ".join(others) + ".")


# -- estimator studies --------------------------------------------------------------------------
def _study_files(folder: Path) -> list[Path]:
    """The estimator studies in ``folder`` and in its direct subfolders (``latentlm bench
    estimators RUN`` writes ``RUN/estimator_study/``)."""
    from latentlm.report.estimator_study import STUDY_FILE

    return sorted(p for p in (folder / STUDY_FILE, *folder.glob(f"*/{STUDY_FILE}")) if p.is_file())


def _study_section(report: Report, path: Path, base: Path, level: int) -> None:
    """Bias and variance of each gradient estimator (log-scale bars) and the study's table."""
    from latentlm.report.estimator_study import plot_study, read_study

    where = path.parent.relative_to(base).as_posix() if path.parent != base else ""
    title = "Estimator study" + (f" ({where})" if where else "")
    report.heading(level, title)
    try:
        rows = read_study(path)
    except ValueError as err:
        report.text(f"Skipped: {err}")
        return
    first = rows[0]
    report.text(f"{path}: each gradient estimator of q's parameters against the exact gradient on one fixed "
                f"batch, {first.get('draws', '?')} draws each. Bias = ‖mean − exact‖, with its Monte Carlo noise "
                "floor √(tr Σ / N) and the excess √(bias² − floor²) over it; variance = tr Σ, the total variance "
                "of one draw; log scales (an exact estimator's zero is a grey stub).")
    slug = _slug("_".join(path.parent.resolve().parts[-2:]))
    report.figure(f"{slug}_estimator_study", plot_study(rows), f"{title}: gradient bias and variance per "
                                                                 "estimator (log scale)")
    header = ["estimator", "target", "S", "bias", "noise floor", "excess", "variance tr Σ", "cosine", "ms / draw"]
    body = [[str(r["estimator"]), str(r.get("target", "—")), _fmt(r.get("samples")), _sci(r["bias"]),
             _sci(r["bias_floor"]), _sci(r["bias_excess"]), _sci(r["variance"]), _fmt(r.get("cosine")),
             _fixed(r.get("ms_per_draw"), 1)] for r in rows]
    report.table(header, body)


def _sci(value: Any) -> str:
    return "—" if value is None or value == "" else f"{float(value):.3g}"


def _fixed(value: Any, digits: int) -> str:
    return "—" if value is None or value == "" else f"{float(value):.{digits}f}"


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "—"
    value = float(value)
    return f"{value:.0f}" if value.is_integer() and abs(value) < 1e6 else f"{value:.3f}"


def _model_sections(report: Report, run: Path, title: str, slug: str, level: int) -> None:
    """What needs the trained model: posterior means, sentences, top words."""
    import torch

    from latentlm.models.base import FiniteLatentModel
    from latentlm.models.hmm import HMMBase
    from latentlm.models.nb_mixture import NaiveBayesMixture
    from latentlm.models.sentence_vae import SentenceVAE
    from latentlm.system import load_pretrained
    from latentlm.training import load_corpus

    if not (run / "model.safetensors").is_file():
        return
    system, config, vocab = load_pretrained(run, device="cpu")
    model = system.model
    torch.manual_seed(config.eval.seed)
    needs_data = system.posterior is not None or (isinstance(model, FiniteLatentModel)
                                                 and not isinstance(model, NaiveBayesMixture))
    data = None
    if needs_data:
        config.data.valid_limit = min(MEANS_SENTENCES, config.data.valid_limit or MEANS_SENTENCES)
        data = load_corpus(config, vocab, splits=("valid",))[1]["valid"]
    if system.posterior is not None:
        means = _posterior_means(system, run, data, config.eval.batch_size, config.eval.seed)
        if means is not None:
            report.figure(f"{slug}_means", plot_means(means, title),
                          f"{title}: posterior means of {len(means)} sentences, first two principal components")
    if isinstance(model, SentenceVAE) and system.posterior is not None:
        _sentence_vae_tables(report, system, vocab, data, config.eval.seed, level)
    if isinstance(model, HMMBase):
        log_emit = model.log_probs()[2].detach()
        _top_words_table(report, "state", log_emit, vocab, level)
    elif isinstance(model, NaiveBayesMixture):
        _top_words_table(report, "cluster", model.log_word_probs().detach(), vocab, level)
    elif isinstance(model, FiniteLatentModel) and data is not None:
        _top_words_table(report, "component", _assigned_word_log_probs(model, data, config.eval.batch_size, len(vocab)),
                         vocab, level)


def _posterior_means(system, run: Path, data, batch_size: int, seed: int):
    """The saved test means of a grid row, else E_q[z | x] of the validation sentences (None for a
    q that is not Gaussian)."""
    saved = run / "test_means.safetensors"
    if saved.is_file():
        from safetensors.torch import load_file

        return load_file(str(saved))["means"][:MEANS_SENTENCES].float()
    from latentlm.evaluation.latent import latent_statistics

    _, stats = latent_statistics(system, data, batch_size, seed)
    return None if stats is None or stats.posterior_means() is None else stats.posterior_means().cpu()


def _sentence_vae_tables(report: Report, system, vocab, data, seed: int, level: int) -> None:
    from latentlm.device import device_generator, module_device
    from latentlm.evaluation import interpolate, reconstruct, sample_sentences

    model, posterior = system.model, system.posterior
    gen = device_generator(seed, module_device(system))
    report.heading(level, "Samples from the prior")
    report.table(["#", "sentence"], [[str(i + 1), s] for i, s in
                                     enumerate(sample_sentences(model, vocab, TEXT_EXAMPLES, generator=gen))])
    sentences = [vocab.decode(data.examples[i].tolist()) for i in range(min(TEXT_EXAMPLES, len(data)))]
    if not sentences:
        return
    report.heading(level, "Reconstructions (greedy from the posterior mean)")
    report.table(["sentence", "reconstruction"],
                 [[" ".join(s), r] for s, r in zip(sentences, reconstruct(model, posterior, vocab, sentences))])
    if len(sentences) >= 2:
        a, b = sentences[0], sentences[1]
        report.heading(level, "Interpolation between two sentences' posterior means")
        lines = interpolate(model, posterior, vocab, a, b, steps=5)
        report.table(["t", "decoded"], [[f"{i / (len(lines) - 1):.2f}", s] for i, s in enumerate(lines)])


def _assigned_word_log_probs(model, data, batch_size: int, vocab_size: int):
    """(K, V) log relative word frequencies of the sentences each component wins (argmax of
    p(z = k | x)), add-0.1 smoothed: what a component of a mixture of sentence models means."""
    import torch

    counts = torch.full((model.prior().logits.numel(), vocab_size), 0.1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in data.batches(batch_size):
            joint = model.log_likelihood_all(batch) + model.prior().logits.log_softmax(-1)[:, None]  # (K, B)
            winner = joint.argmax(0)  # (B,)
            for k, example, n in zip(winner.tolist(), batch.targets, batch.lengths.tolist()):
                counts[k] += torch.bincount(example[:n], minlength=vocab_size).double()
    model.train(was_training)
    return (counts / counts.sum(-1, keepdim=True)).log()


def _top_words_table(report: Report, what: str, log_probs, vocab, level: int) -> None:
    """State → top words, ranked by p_k(w) log(p_k(w) / p(w)) against the states' average
    (frequent *and* specific; "the" everywhere ranks low)."""
    from latentlm.evaluation.clustering import top_words

    background = log_probs.double().exp().mean(0)
    words = top_words(log_probs.double(), vocab, TOP_WORDS, background=background)
    report.heading(level, f"Top words per {what}")
    report.table([what, f"top {TOP_WORDS} words"], [[str(k), " ".join(w)] for k, w in enumerate(words)])


# -- figures ------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def plot_curves(rows: list[dict[str, str]], title: str) -> bytes | None:
    """Training loss, and validation −ELBO, KL, MI and AU, against the step; panels without
    data (KL/MI/AU of a model without a latent variable) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(split: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r["split"] == split and r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [("loss (train)", [series("train", "loss"), series("e_step", "loss")]),
              ("−ELBO / NLL (valid)", [series("valid", "nll")]),
              ("KL (valid)", [series("valid", "kl")]),
              ("MI (valid)", [series("valid", "mi")]),
              ("AU (valid)", [series("valid", "au")])]
    panels = [(name, [s for s in lines if s[0]]) for name, lines in panels]
    panels = [(name, lines) for name, lines in panels if lines]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 2.8), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels):
        for steps, values in lines:
            ax.plot(steps, values, marker="." if len(steps) < 40 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_means(means, title: str) -> bytes:
    """Posterior means (N, D) on their first two principal components (D = 1: against the
    sentence index); a collapsed code is a dot at the origin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from latentlm.report.grid import principal_plane

    if means.size(1) >= 2:
        xy, _ = principal_plane(means)
        x, y, labels = xy[:, 0], xy[:, 1], ("PC1", "PC2")
    else:
        x, y, labels = torch.arange(len(means)).float(), means[:, 0] - means[:, 0].mean(), ("sentence", "z")
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.scatter(x.numpy(), y.numpy(), s=4, alpha=0.5)
    ax.set(xlabel=labels[0], ylabel=labels[1])
    ax.set_title(f"{title}\nposterior means, N = {len(means)}", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)
