"""The command line: the whole surface on a tiny run, and clear errors instead of tracebacks."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def run_cli(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "latentlm.cli.main", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "vae"
    proc = run_cli("train", REPO / "configs" / "tiny_vae.yaml", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_evaluate_json_has_the_promised_keys(trained_vae):
    # the whole split unless --limit (the training config's test_limit of 60 does not apply)
    proc = run_cli("evaluate", trained_vae, "--split", "test", "--samples", "5", "--json", "--limit", "60")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("nll", "ppl", "elbo", "kl", "mi", "au", "examples", "tokens"):
        assert key in result
    assert result["examples"] == 60 and result["nll"] > 0 and result["nll"] <= -result["elbo"] + 1.0


def test_evaluate_says_how_many_examples_it_scored(trained_vae):
    proc = run_cli("evaluate", trained_vae, "--split", "valid", "--samples", "2", "--limit", "7")
    assert proc.returncode == 0 and "scored 7 examples of the valid split (--limit 7)" in proc.stderr


def test_sample_and_interpolate(trained_vae):
    proc = run_cli("sample", trained_vae, "-n", "3")
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 3
    proc = run_cli("interpolate", trained_vae, "the company said", "mr. smith is chairman", "--steps", "4")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 4


@pytest.mark.parametrize(
    "content, message",
    [(b"", "file is empty"), (b"a b\n\n", "train.txt:2: empty line"), (b"a \xff b\n", "train.txt:1: bytes that are not UTF-8")],
)
def test_bad_corpus_gives_one_clear_line(tmp_path, tiny_corpus, content, message):
    (tiny_corpus / "train.txt").write_bytes(content)
    proc = run_cli("train", REPO / "configs" / "tiny_lm.yaml", "--out", tmp_path / "run", "--data-dir", tiny_corpus,
                   "--set", "data.name=tiny")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_corpus_and_bad_run_dir(tmp_path):
    proc = run_cli("train", REPO / "configs" / "tiny_lm.yaml", "--out", tmp_path / "run", "--data-dir", tmp_path,
                   "--set", "data.name=nothing_here")
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("evaluate", tmp_path)
    assert proc.returncode == 2 and "missing config.json" in proc.stderr


def test_unknown_tokens_map_to_unk(trained_vae):
    proc = run_cli("interpolate", trained_vae, "zzzqqq xxyyzz", "the", "--steps", "2")
    assert proc.returncode == 0, proc.stderr


def test_lm_trains_on_a_user_corpus(tmp_path, tiny_corpus):
    proc = run_cli("train", REPO / "configs" / "tiny_lm.yaml", "--out", tmp_path / "run", "--data-dir", tiny_corpus,
                   "--set", "data.name=tiny", "--set", "train.epochs=1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("evaluate", tmp_path / "run", "--json")
    assert json.loads(proc.stdout)["examples"] == 30


def test_tag_writes_states_and_scores_gold_tags(tmp_path):
    out = tmp_path / "hmm"
    proc = run_cli("train", REPO / "configs" / "tiny_hmm.yaml", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    tsv = tmp_path / "gold.tsv"
    tsv.write_text("the\tDT\ncompany\tNN\nsaid\tVBD\n\nprices\tNNS\nfell\tVBD\n\n")
    proc = run_cli("tag", out, "--data", tsv, "--states", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [len(s) for s in result["states"]] == [3, 2]
    assert all(0 <= k < 8 for s in result["states"] for k in s)
    assert 0 < result["many_to_one"] <= 1 and "v_measure" in result
    proc = run_cli("evaluate", out, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["samples"] == 0  # exact marginal


def test_cluster_scores_the_best_of_several_em_runs(tmp_path):
    docs = tmp_path / "docs.jsonl"
    topics = {"sport": "match goal team player season coach league win", "money": "bank market shares profit price stock rate fund"}
    lines = []
    g = __import__("random").Random(0)
    for i in range(60):
        label = "sport" if i % 2 else "money"
        words = topics[label].split()
        lines.append(json.dumps({"id": str(i), "label": label, "label_id": i % 2,
                                 "text": " ".join(g.choice(words) for _ in range(30))}))
    docs.write_text("\n".join(lines) + "\n")
    config = tmp_path / "m1.yaml"
    config.write_text(f"""
data: {{name: docs, format: documents, files: {{train: {docs}, valid: {docs}, test: {docs}}}, min_df: 1}}
model: {{type: nb_mixture, num_clusters: 2}}
objective: {{type: exact}}
train: {{learner: em, epochs: 30, batch_size: 16, em: {{smoothing: 0.01, tol: 1.0e-6,
        anneal: {{beta_start: 0.05, beta_growth: 2.0, iters_per_beta: 3}}}}}}
""")
    for seed in (0, 1):  # two restarts
        proc = run_cli("train", config, "--out", tmp_path / f"m1_{seed}", "--set", f"seed={seed}", "--quiet")
        assert proc.returncode == 0, proc.stderr
    proc = run_cli("cluster", tmp_path / "m1_0", tmp_path / "m1_1", "--kmeans", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["nmi"] > 0.9 and len(result["assignments"]) == 60 and "kmeans_tfidf" in result
    objectives = result["training_objectives"]
    assert len(objectives) == 2 and objectives[result["run"]] == max(objectives.values())
    proc = run_cli("evaluate", tmp_path / "m1_0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["examples"] == 60


def test_evaluate_in_bf16_stays_close_to_fp32(trained_vae):
    fp32 = json.loads(run_cli("evaluate", trained_vae, "--samples", "20", "--json").stdout)
    bf16 = json.loads(run_cli("evaluate", trained_vae, "--samples", "20", "--json", "--precision", "bf16-mixed").stdout)
    assert bf16["precision"] == "bf16-mixed" and abs(bf16["nll"] - fp32["nll"]) < 0.5
