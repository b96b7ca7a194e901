"""Multi-process data-parallel training with torch.distributed (DDP over gloo on CPU)."""

import csv
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from conftest import REPO


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentlm.cli.main", "train", str(REPO / "configs" / "tiny_lm.yaml"), "--out", str(out),
           "--quiet", "--set", "train.epochs=3", "--set", "train.num_threads=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    valid = [float(r["nll"]) for r in rows if r["split"] == "valid"]
    assert len(valid) == 3 and valid[-1] < valid[0] - 1.0
    # each rank takes half of the 19 batches per epoch: 9 steps per epoch
    assert max(int(r["step"]) for r in rows) == 27
    assert (out / "model.safetensors").is_file()
    # the checkpoint holds every rank's CPU generator (gathered with all_gather, no pickles)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    rng = load_file(str(out / "checkpoints" / latest["folder"] / "rng.safetensors"))
    assert {k for k in rng if k.startswith("rng.cpu.")} == {"rng.cpu.0", "rng.cpu.1"}
