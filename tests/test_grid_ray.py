"""`latentlm grid --backend ray`: each config x seed a Ray task on a local Ray instance, with
the process pool's resume semantics (a finished row is skipped, a killed one continues from
its checkpoint). Skipped with the reason where Ray is not installed (`pip install latentlm[ray]`)."""

import json

import pytest

from conftest import REPO

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'latentlm[ray]'")

from latentlm.report.grid import GridError, run_grid  # noqa: E402


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::ResourceWarning")
def test_two_rows_on_local_ray_one_killed_then_resumed(tmp_path, monkeypatch):
    short = tmp_path / "short.yaml"   # 4 steps: finishes before the kill
    long = tmp_path / "long.yaml"     # 8 steps: killed at step 6, after its step-6 checkpoint
    for path, base, steps in ((short, "tiny_lm", 4), (long, "tiny_vae", 8)):  # each row's own budget
        text = (REPO / "configs" / f"{base}.yaml").read_text()
        path.write_text(text.replace("train: {", f"train: {{max_steps: {steps}, ", 1))
    out = tmp_path / "grid"
    budget = ["train.checkpoint_every=2", "train.log_every=2", "eval.samples=2", "train.epochs=1"]
    configs = [str(short), str(long)]

    def grid():
        return run_grid(configs, out, overrides=budget, backend="ray", threads=1, cpus_per_task=1, gap_sentences=0,
                        test_limit=10, log=lambda *_: None, progress=False)

    monkeypatch.setenv("LATENTLM_KILL_AT_STEP", "6")  # SIGKILL of the task's worker process at step 6
    with pytest.raises(GridError, match="1 of 2 grid runs failed"):
        grid()
    done = out / "short" / "seed0" / "result.json"
    assert done.is_file() and not (out / "long" / "seed0" / "result.json").exists()
    failure = json.loads((out / "long" / "seed0" / "failed.json").read_text())
    assert failure["seed"] == 0 and failure["error"]
    assert "seed 0: " in (out / "grid.md").read_text()  # the table says which row failed and why
    before = done.stat().st_mtime_ns

    monkeypatch.delenv("LATENTLM_KILL_AT_STEP")
    results = grid()
    assert {r["label"]: r["steps"] for r in results} == {"short": 4, "long": 8}
    assert done.stat().st_mtime_ns == before  # the finished row was skipped
    rows = (out / "long" / "seed0" / "metrics.csv").read_text().splitlines()
    steps = [int(line.split(",")[1]) for line in rows[1:] if line.startswith("train,")]
    assert steps == sorted(set(steps)) and max(steps) == 8  # continued from step 6, no step twice
    assert not (out / "long" / "seed0" / "failed.json").exists()
    assert "| long | 1 | 8 |" in (out / "grid.md").read_text()
