"""`latentlm report`: report.md and a self-contained report.html about runs and grids, checked
in a real browser (headless Chromium); the collapse watch; the grid's intervals."""

import json
import logging
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO
from latentlm.cli.main import main as cli
from latentlm.config import load_config
from latentlm.report.document import build_report
from latentlm.report.grid import format_cell, summarize
from latentlm.training import train
from latentlm.training.collapse import REMEDIES, CollapseWatch, collapse_step, looks_collapsed

BUDGET = ["train.max_steps=12", "train.eval_every=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An LM, a sentence VAE and an HMM, a dozen steps each, in one folder, and its report."""
    out = tmp_path_factory.mktemp("runs")
    for name in ("tiny_lm", "tiny_vae", "tiny_hmm"):
        train(load_config(REPO / "configs" / f"{name}.yaml", BUDGET), out / name, progress=False)
    page = build_report([out], out / "report")
    return out, page


def test_report_has_a_section_per_run_with_curves_means_sentences_and_top_words(runs):
    out, page = runs
    md = (out / "report" / "report.md").read_text()
    for name in ("tiny_lm", "tiny_vae", "tiny_hmm"):
        assert f"## {name}" in md
    assert "Samples from the prior" in md and "Reconstructions" in md and "Interpolation" in md
    assert "Top words per state" in md
    figures = sorted(p.name for p in (out / "report" / "figures").iterdir())
    assert sum(f.endswith("_curves.png") for f in figures) == 3 and sum(f.endswith("_means.png") for f in figures) == 1
    html = page.read_text()
    # self-contained: every image inline, nothing fetched, no script
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_the_command_line_writes_the_report_where_asked(runs, tmp_path, capsys):
    out, _ = runs
    assert cli(["report", str(out / "tiny_lm"), "--out", str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert "## tiny_lm" in (tmp_path / "report.md").read_text()


def _chromium() -> tuple[str | None, str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path, ""
    setup = subprocess.run(["bash", str(REPO / "scripts" / "ensure_chromium.sh")], capture_output=True, text=True,
                           timeout=900)
    if setup.returncode == 0 and setup.stdout.strip():
        return setup.stdout.strip().splitlines()[-1], ""
    return None, setup.stderr.strip()[-500:]


CHECK = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src) || "error")), true);
const consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.join(" ")); consoleError(...a); };
window.addEventListener("load", () => {
  const images = [...document.images];
  const result = {images: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
                  widths: images.map(i => i.naturalWidth), tables: document.querySelectorAll("table").length,
                  errors: window.__errors};
  const pre = document.createElement("pre");
  pre.id = "latentlm-check";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def _render(page, tmp_path):
    """What headless Chromium makes of ``page``: images (decoded), tables, errors, console lines."""
    chromium, why = _chromium()
    if chromium is None:
        pytest.skip(f"no Chromium and scripts/ensure_chromium.sh could not install it: {why}")
    # the check runs in a copy of the page (the report itself has no script)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("<head>", "<head>" + CHECK, 1))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000"]
    env = {**os.environ, "HOME": str(tmp_path)}  # a profile of its own
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="latentlm-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stdout[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    check["console"] = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    return check, flags, env


def test_report_renders_in_headless_chromium(runs, tmp_path):
    _, page = runs
    check, flags, env = _render(page, tmp_path)
    assert check["images"] == 4 and check["decoded"] == 4, check  # every figure decoded (natural width > 0)
    # summaries of 3 runs, the VAE's samples / reconstructions / interpolation, the HMM's top words
    assert check["tables"] == page.read_text().count("<table>") == 7 and check["errors"] == [], check
    assert check["console"] == [], check["console"]  # the page logged nothing to the console
    shot = REPO / "runs" / "report_screenshot.png" if os.environ.get("LATENTLM_KEEP_SCREENSHOT") else tmp_path / "shot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    taken = subprocess.run([*flags, "--window-size=1280,4000", f"--screenshot={shot}", page.as_uri()],
                           capture_output=True, text=True, timeout=180, env=env)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]


# -- a run's own figures (e.g. a translation model's alignment heatmaps) ----------------------------
def _heatmap(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(np.random.default_rng(0).dirichlet(np.ones(5), size=4), cmap="Greys")
    fig.savefig(path, format="png", dpi=50)
    plt.close(fig)


def _images(html: str) -> list[tuple[str, str]]:
    """(caption, base64 data) of every figure of a report page."""
    return re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"><figcaption>([^<]*)</figcaption>',
                      html)


def test_every_png_of_a_runs_figures_folder_is_embedded_captioned_by_stem(runs, tmp_path):
    import base64

    out, _ = runs
    run = tmp_path / "translation"
    shutil.copytree(out / "tiny_lm", run)
    (run / "figures").mkdir()
    for stem in ("alignment_de_en_0", "alignment_de_en_1"):
        _heatmap(run / "figures" / f"{stem}.png")
    (run / "figures" / "alignment_de_en_0.json").write_text('{"src": ["a"], "tgt": ["b"]}')
    (run / "figures" / "broken.png").write_bytes(b"not a png")
    # written into the run folder (the command's default), twice: the report's own curves land in the
    # run's figures/ but are never taken for the run's figures
    for _ in range(2):
        page = build_report([run], run)
        html, md = page.read_text(), (run / "report.md").read_text()
        images = _images(html)
        assert [caption for _, caption in images[1:]] == ["alignment_de_en_0", "alignment_de_en_1"], images
        assert "<h3>Figures</h3>" in html and "alignment_de_en_0.json" in html and "broken.png" in html
        assert base64.b64decode(images[1][0]) == (run / "figures" / "alignment_de_en_0.png").read_bytes()
        # the Markdown links the run's own file (already in figures/), no copy
        assert "](figures/alignment_de_en_0.png)" in md and "](figures/alignment_de_en_1.png)" in md
    assert len(list((run / "figures").glob("*.png"))) == 4  # 2 heatmaps, broken.png, the report's curves
    # elsewhere, the figures are copied beside the report
    page = build_report([run], tmp_path / "elsewhere")
    assert [c for _, c in _images(page.read_text())][1:] == ["alignment_de_en_0", "alignment_de_en_1"]
    copied = sorted((tmp_path / "elsewhere" / "figures").glob("*_figure_alignment_de_en_*.png"))
    assert [p.read_bytes() for p in copied] == [(run / "figures" / f"alignment_de_en_{i}.png").read_bytes()
                                                for i in (0, 1)]


# -- the estimator study ----------------------------------------------------------------------------
def test_bench_estimators_writes_the_study_the_report_draws_and_it_renders(monkeypatch, tmp_path, capsys):
    import latentlm.report.estimator_study as study

    cfg = tmp_path / "m2.yaml"
    cfg.write_text("data: {name: ptb, train_limit: 40, valid_limit: 20, max_vocab: 200}\n"
                   "model: {type: rnn_mixture, num_components: 3, embed_dim: 8, hidden_dim: 8, component_dim: 4}\n"
                   "posterior: {type: categorical_lstm, embed_dim: 8, hidden_dim: 8}\n"
                   "objective: {type: elbo, estimator: enumerate}\ntrain: {max_steps: 2, batch_size: 8}\n")
    train(load_config(cfg), tmp_path / "m2", progress=False)
    monkeypatch.setattr(study, "DEFAULT_ESTIMATORS", {  # a tiny study: three cheap estimators
        "enumerate": {"type": "elbo", "estimator": "enumerate"},
        "score_function": {"type": "elbo", "estimator": {"type": "score_function", "baseline": "none"}},
        "sf_leave_one_out": {"type": "elbo", "estimator": {"type": "score_function", "baseline": "leave_one_out"}}})
    folder = tmp_path / "study"
    assert cli(["bench", "estimators", str(tmp_path / "m2"), "--out", str(folder), "--draws", "4",
                "--batch-size", "4", "--samples", "2"]) == 0
    assert (folder / study.STUDY_FILE).is_file()
    rows = study.read_study(folder / study.STUDY_FILE)
    assert cli(["report", str(folder), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    md, page = (tmp_path / "report" / "report.md").read_text(), tmp_path / "report" / "report.html"
    html = page.read_text()
    assert "## Estimator study" in md and "estimator_study.png)" in md
    assert [c for _, c in _images(html)] == ["Estimator study: gradient bias and variance per estimator (log scale)"]
    for r in rows:  # the table: one row per estimator, its variance as the study wrote it
        assert f"<td>{r['estimator']}</td>" in html and f"<td>{r['variance']:.3g}</td>" in html
    assert html.count("<tr>") == len(rows) + 1
    # the bench's default folder, RUN/estimator_study/, shows in the run's own section
    study.write_study(rows, tmp_path / "m2" / "estimator_study")
    text = build_report([tmp_path / "m2"], tmp_path / "run_report").with_suffix(".md").read_text()
    assert "### Estimator study (estimator_study)" in text and "| sf_leave_one_out |" in text
    with pytest.raises(ValueError, match="not an estimator study"):
        (tmp_path / "bad.json").write_text("[]")
        study.read_study(tmp_path / "bad.json")
    check, _, _ = _render(page, tmp_path)
    assert check["images"] == check["decoded"] == 1 and check["tables"] == 1, check
    assert check["errors"] == [] and check["console"] == [], check


# -- collapse ---------------------------------------------------------------------------------
def test_collapse_watch_fires_once_after_two_collapsed_validations():
    collapsed, alive = {"kl": 0.02, "au": 0, "mi": 0.0}, {"kl": 3.0, "au": 4, "mi": 1.0}
    assert looks_collapsed(collapsed) and not looks_collapsed(alive)
    assert not looks_collapsed({"kl": 0.05, "au": 1})  # one active unit: not collapsed
    assert looks_collapsed({"kl": 0.05, "au": None, "mi": 0.001})  # categorical q: by MI
    watch = CollapseWatch()
    assert watch.update(10, collapsed) is None and watch.update(20, alive) is None  # not in a row
    assert watch.update(30, collapsed) is None
    message = watch.update(40, collapsed)
    assert message and all(r in message for r in REMEDIES) and watch.warned_at == 40
    assert watch.update(50, collapsed) is None  # once
    rows = [{"step": s, **m} for s, m in ((1, alive), (2, collapsed), (3, collapsed))]
    assert collapse_step(rows) == 3 and collapse_step(rows[:2]) is None


def test_trainer_warns_once_in_the_log_when_validation_shows_collapse(monkeypatch, caplog, tmp_path):
    import latentlm.training.trainer as trainer

    real = trainer.validate

    def collapsed(*args, **kwargs):
        return {**real(*args, **kwargs), "kl": 0.01, "mi": 0.0, "au": 0}

    monkeypatch.setattr(trainer, "validate", collapsed)
    config = load_config(REPO / "configs" / "tiny_vae.yaml", ["train.max_steps=8", "train.eval_every=2"])
    with caplog.at_level(logging.WARNING, logger="latentlm"):
        train(config, tmp_path / "run", progress=False)
    warnings = [r.getMessage() for r in caplog.records if "posterior collapse" in r.getMessage()]
    assert len(warnings) == 1 and "step 4" in warnings[0] and "objective.free_bits" in warnings[0]


def _collapsed_validation(monkeypatch):
    import latentlm.training.trainer as trainer

    real = trainer.validate
    monkeypatch.setattr(trainer, "validate", lambda *a, **k: {**real(*a, **k), "kl": 0.01, "mi": 0.0, "au": 0})


def _collapse_warnings(caplog) -> list[str]:
    found = [r.getMessage() for r in caplog.records if "posterior collapse" in r.getMessage()]
    caplog.clear()
    return found


def _saved_watch(run):
    folder = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["folder"]
    return json.loads((folder / "state.json").read_text())["collapse"]


def test_the_collapse_watch_is_in_the_checkpoint_a_resumed_run_neither_warns_again_nor_loses_the_streak(
        monkeypatch, caplog, tmp_path):
    _collapsed_validation(monkeypatch)
    config = lambda steps: load_config(REPO / "configs" / "tiny_vae.yaml",  # noqa: E731
                                       [f"train.max_steps={steps}", "train.eval_every=2"])
    with caplog.at_level(logging.WARNING, logger="latentlm"):
        # warned at step 4; resumed, collapsed validations at 6 and 8 do not warn again
        train(config(4), tmp_path / "warned", progress=False)
        assert ["step 4" in w for w in _collapse_warnings(caplog)] == [True]
        assert _saved_watch(tmp_path / "warned") == {"streak": 2, "warned_at": 4}
        train(config(8), tmp_path / "warned", resume=True, progress=False)
        assert _collapse_warnings(caplog) == []
        assert _saved_watch(tmp_path / "warned") == {"streak": 4, "warned_at": 4}
        # one collapsed validation (step 2) before the stop: the resumed run warns at the second (step 4)
        train(config(2), tmp_path / "streak", progress=False)
        assert _collapse_warnings(caplog) == [] and _saved_watch(tmp_path / "streak") == {"streak": 1, "warned_at": None}
        train(config(4), tmp_path / "streak", resume=True, progress=False)
        assert ["step 4" in w for w in _collapse_warnings(caplog)] == [True]


def test_a_checkpoint_without_the_collapse_watch_replays_it_from_metrics_csv(monkeypatch, caplog, tmp_path):
    _collapsed_validation(monkeypatch)
    config = lambda steps: load_config(REPO / "configs" / "tiny_vae.yaml",  # noqa: E731
                                       [f"train.max_steps={steps}", "train.eval_every=2"])
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="latentlm"):
        train(config(4), run, progress=False)
        assert len(_collapse_warnings(caplog)) == 1
        for state in run.glob("checkpoints/step-*/state.json"):  # as written before the watch was saved
            body = json.loads(state.read_text())
            body.pop("collapse")
            state.write_text(json.dumps(body))
        train(config(6), run, resume=True, progress=False)
        assert _collapse_warnings(caplog) == []


# -- intervals ------------------------------------------------------------------------------------
def test_summary_is_mean_sample_sd_and_a_t_interval():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0) and s["n"] == 3
    half = 4.302652729911275 / 3 ** 0.5  # t_{0.975, 2} * sd / sqrt(n)
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert format_cell(s, 2) == "2.00 ± 1.00 [-0.48, 4.48]"
    one = summarize([5.0])
    assert one["sd"] is None and one["ci95"] is None and format_cell(one, 1) == "5.0"


# -- corpus files (rough edges a newcomer hit) ---------------------------------------------------------
def test_a_byte_order_mark_is_stripped_and_control_characters_are_rejected_with_file_and_line(tmp_path):
    from latentlm.data.corpus import read_lines
    from latentlm.errors import CorpusError

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffthe cat sat\na dog\n".encode("utf-8"))
    assert read_lines(bom).lines[0] == ["the", "cat", "sat"]
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"the cat\na d\x00og\n")
    with pytest.raises(CorpusError, match=r"nul\.txt:2: control character '\\x00'"):
        read_lines(nul)
