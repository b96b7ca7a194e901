"""`latentlm grid`: every config trained under one budget, evaluated, tabulated and plotted;
a failing row loses nothing else; a rerun skips finished rows."""

import json
from pathlib import Path

import pytest

from latentlm.report.grid import GridError, run_grid, run_label, update_results_file

REPO = Path(__file__).resolve().parents[1]
BUDGET = ["train.max_steps=6", "train.eval_every=3", "train.epochs=1", "eval.samples=4"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    configs = [str(REPO / "configs" / "tiny_lm.yaml"), str(REPO / "configs" / "tiny_vae.yaml")]
    logs = []
    results = run_grid(configs, out, seeds=2, overrides=BUDGET, gap_sentences=8, gap_steps=2, log=logs.append)
    return out, configs, results, logs


def test_each_config_and_seed_is_trained_evaluated_and_summarized(grid):
    out, _, results, logs = grid
    assert len(results) == 4 and len(logs) == 4
    vae = json.loads((out / "tiny_vae" / "seed1" / "result.json").read_text())
    assert vae["seed"] == 1 and vae["steps"] == 6 and vae["samples"] == 4
    assert vae["nll"] > 0 and vae["kl"] >= 0 and 0 <= vae["au"] <= 4 and vae["gap"] is not None
    assert vae["nll"] <= -vae["elbo"] + 1.0  # IS-4 estimate sits near or below the bound
    lm = json.loads((out / "tiny_lm" / "seed0" / "result.json").read_text())
    assert lm["gap"] is None and lm["kl"] == 0 and lm["nll"] == pytest.approx(-lm["elbo"])
    seeds = [json.loads((out / "tiny_vae" / f"seed{s}" / "result.json").read_text())["nll"] for s in (0, 1)]
    assert seeds[0] != seeds[1]  # the seed override reached the run


def test_validation_curves_carry_kl_and_mi_and_the_report_has_every_row(grid):
    out, _, _, _ = grid
    rows = [line for line in (out / "tiny_vae" / "seed0" / "metrics.csv").read_text().splitlines()
            if line.startswith("valid,")]
    assert len(rows) >= 2 and all(r.split(",")[8] != "" for r in rows)  # the mi column is filled
    table = (out / "grid.md").read_text()
    assert "| tiny lm | 2 | 6 |" in table and "| tiny vae | 2 | 6 |" in table and " ± " in table
    assert (out / "kl_mi.png").stat().st_size > 1000 and (out / "posterior_means.png").stat().st_size > 1000


def test_a_rerun_skips_finished_rows_and_a_broken_row_loses_nothing_else(grid, tmp_path):
    out, configs, _, _ = grid
    before = (out / "tiny_vae" / "seed0" / "result.json").stat().st_mtime_ns
    broken = tmp_path / "broken.yaml"
    broken.write_text((REPO / "configs" / "tiny_vae.yaml").read_text().replace("type: elbo", "type: no_such_objective"))
    logs = []
    with pytest.raises(GridError, match="1 of 3 grid runs failed"):
        run_grid([str(broken), *configs], out, seeds=1, overrides=BUDGET, log=logs.append)
    assert (out / "tiny_vae" / "seed0" / "result.json").stat().st_mtime_ns == before  # skipped, not redone
    assert sum("FAILED" in line for line in logs) == 1 and len(logs) == 3


def test_results_file_block_is_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n")
    update_results_file(path, "collapse", "| a |\n")
    update_results_file(path, "collapse", "| b |\n")
    text = path.read_text()
    assert text.startswith("# Results\n\nintro\n") and "| b |" in text and "| a |" not in text
    assert text.count("grid:collapse:start") == 1
    assert run_label("configs/ptb/collapse/04_free_bits.yaml") == "free bits"


def test_training_time_adds_up_the_segments_of_a_resumed_run(tmp_path):
    from latentlm.report.grid import _training_seconds

    rows = ["split,step,elapsed_s", "train,50,10.0", "train,100,20.0", "valid,100,", "train,150,4.0", "train,200,9.0"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert _training_seconds(tmp_path) == pytest.approx(29.0)


def test_reference_and_goal_columns_are_paired_by_seed_and_kept_for_redraws(grid):
    """--reference adds NLL minus the reference row's, paired by seed; --goal says per row which
    terms its means fail; both are saved so a redraw (report, --report-only) keeps them."""
    from latentlm.errors import ConfigError
    from latentlm.report.grid import collect, parse_goal, write_report

    out, configs, _, _ = grid
    table = write_report(out, configs, reference="tiny_lm", goal="au>=0,kl>=1000,nll<=ref")
    header, *_, lm_line, vae_line = [line for line in table.splitlines() if line.startswith("| ")]
    assert "ΔNLL vs tiny lm" in header and "goal (au>=0,kl>=1000,nll<=ref)" in header
    runs = {(Path(r["config"]).stem, r["seed"]): r for row in collect(out, configs) for r in row["runs"]}
    deltas = [runs["tiny_vae", s]["nll"] - runs["tiny_lm", s]["nll"] for s in (0, 1)]
    mean = sum(deltas) / 2
    sd = abs(deltas[0] - deltas[1]) / 2 ** 0.5
    assert f"{mean:.2f} ± {sd:.2f}" in vae_line
    assert "no: KL" in vae_line and "not >= 1000" in vae_line and "AU" not in vae_line.split("no:")[1]
    lm_cells = [c.strip() for c in lm_line.split("|")]
    assert lm_cells[header.split("|").index(" ΔNLL vs tiny lm ")] == "–"  # the reference itself
    assert "(the reference)" in lm_line
    assert "ΔNLL vs tiny lm" in write_report(out, configs)  # saved with the grid
    assert parse_goal("kl >= 5, mi>=2,nll<=ref") == [("kl", ">=", 5.0), ("mi", ">=", 2.0), ("nll", "<=", None)]
    for bad in ("kl=>5", "klx>=5", "kl>=five"):
        with pytest.raises(ConfigError, match="grid --goal"):
            parse_goal(bad)
