#!/usr/bin/env bash
# `make gpu-check`: on a machine with a CUDA GPU, run the CUDA-marked tests, a short PTB
# sentence-VAE training (train.device auto, bf16-mixed, a few hundred steps) and its
# evaluation, and print where each part ran. A summary lands in $OUT/gpu_check.json.
#
# It works from a bare copy of the repository. The CPU build of torch that `make venv` puts in
# .venv cannot see a GPU, so torch comes from the machine's preinstalled Python:
#   GPU_PYTHON=/path/to/python   use this interpreter (its torch must see a GPU);
#   otherwise the first of python3, python, /usr/bin/python3, /usr/local/bin/python3,
#   /opt/conda/bin/python whose torch sees a GPU.
# latentlm itself is imported from src/ (PYTHONPATH), nothing is installed for it. Its other
# requirements come from that Python when it has them; missing ones are pip-installed into
# .venv-gpu, a venv that sees the system site-packages (so it keeps the system's CUDA torch).
#
# Settings (environment): STEPS (training steps, default 300), DATA (the PTB folder or a
# folder holding ptb/; default: $LATENTLM_DATA, then ../shared/data/ptb, then shared/data/ptb),
# OUT (default runs/gpu-check; emptied first), EVAL_LIMIT (test sentences, default 500),
# EVAL_SAMPLES (importance samples, default 50), ALLOW_CPU=1 (no GPU: run all of it on the CPU
# with CPU_PYTHON or `make venv`'s .venv, a smoke test of this script; without it the script
# stops with exit code 3).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STEPS=${STEPS:-300}
OUT=${OUT:-runs/gpu-check}
EVAL_LIMIT=${EVAL_LIMIT:-500}
EVAL_SAMPLES=${EVAL_SAMPLES:-50}
started=$(date +%s)

say() { printf '\n== %s ==\n' "$*"; }

say "looking for a Python whose torch sees a CUDA GPU"
probe='import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())'
PY=""
for candidate in "${GPU_PYTHON:-}" python3 python /usr/bin/python3 /usr/local/bin/python3 /opt/conda/bin/python; do
  [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
  if ! info=$(env -u PYTHONPATH "$candidate" -c "$probe" 2>/dev/null); then
    echo "  $candidate: no importable torch"
    continue
  fi
  read -r version cuda available count <<<"$info"
  echo "  $candidate: torch $version, CUDA $cuda, GPU visible: $available ($count device(s))"
  if [ "$available" = "True" ]; then PY=$(command -v "$candidate"); break; fi
done
if [ -n "${GPU_PYTHON:-}" ] && [ "$PY" != "$(command -v "$GPU_PYTHON" 2>/dev/null)" ]; then
  echo "GPU_PYTHON=$GPU_PYTHON has no torch that sees a GPU (see above)"
fi
if [ -z "$PY" ]; then
  gpus=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo "no nvidia-smi")
  echo "No CUDA: none of these Pythons has a torch that sees a GPU (nvidia-smi -L: $gpus)."
  if [ "${ALLOW_CPU:-0}" != "1" ]; then
    echo "Run this on a GPU machine (set GPU_PYTHON to its CUDA-enabled python), or ALLOW_CPU=1 for a CPU smoke test."
    exit 3
  fi
  PY=${CPU_PYTHON:-$REPO/.venv/bin/python}
  echo "ALLOW_CPU=1: running everything on the CPU with $PY (the CUDA-marked tests will be skipped)."
  [ -n "${CPU_PYTHON:-}" ] || make -s venv || exit 4
fi

# latentlm's other requirements (pyproject: dependencies + dev)
missing=$(env -u PYTHONPATH "$PY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy", "safetensors": "safetensors", "yaml": "pyyaml", "tqdm": "tqdm",
        "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib",
        "pytest": "pytest", "hypothesis": "hypothesis"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  say "$PY lacks: $missing; installing them into .venv-gpu (system site-packages visible: its torch stays)"
  [ -x .venv-gpu/bin/python ] || "$PY" -m venv --system-site-packages .venv-gpu || exit 4
  if ! .venv-gpu/bin/python -m pip install -q $missing; then
    echo "could not install $missing (no network?): install them for $PY, or set GPU_PYTHON to a Python that has them"
    exit 4
  fi
  PY=$REPO/.venv-gpu/bin/python
fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say "where this runs"
"$PY" - <<'EOF'
import platform, sys
import torch
from latentlm.device import describe, resolve_device
print(f"host {platform.node()}, python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"train.device auto -> {describe(resolve_device('auto'))}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

say "CUDA-marked tests (pytest -m cuda) and the device tests"
"$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests
tests_rc=$?
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_device.py
device_tests_rc=$?

rm -rf "$OUT"
mkdir -p "$OUT"
data_args=()
[ -n "${DATA:-}" ] && data_args=(--data-dir "$DATA")
if [ -z "${DATA:-}" ] && [ -z "${LATENTLM_DATA:-}" ] && [ ! -d ../shared/data/ptb ] && [ -d shared/data/ptb ]; then
  data_args=(--data-dir shared/data)
fi

say "PTB sentence VAE: $STEPS steps, train.device auto, bf16-mixed"
t0=$(date +%s)
"$PY" -m latentlm.cli.main train configs/ptb/vae.yaml --out "$OUT/vae" --device auto "${data_args[@]}" --quiet \
  --set train.precision=bf16-mixed --set train.max_steps="$STEPS" --set train.checkpoint_every=100 \
  --set train.log_every=50 --set data.valid_limit=1000 | tee "$OUT/train.json"
train_rc=${PIPESTATUS[0]}
train_s=$(( $(date +%s) - t0 ))

eval_rc=1
if [ "$train_rc" = 0 ]; then
  say "evaluation: first $EVAL_LIMIT test sentences, $EVAL_SAMPLES importance samples, --device auto, bf16-mixed"
  t0=$(date +%s)
  "$PY" -m latentlm.cli.main evaluate "$OUT/vae" --device auto "${data_args[@]}" --limit "$EVAL_LIMIT" \
    --samples "$EVAL_SAMPLES" --precision bf16-mixed --json | tee "$OUT/evaluate.json"
  eval_rc=${PIPESTATUS[0]}
  eval_s=$(( $(date +%s) - t0 ))
fi

say "summary"
TESTS_RC=$tests_rc DEVICE_TESTS_RC=$device_tests_rc TRAIN_RC=$train_rc EVAL_RC=$eval_rc TRAIN_S=$train_s \
EVAL_S=${eval_s:-0} TOTAL_S=$(( $(date +%s) - started )) OUT="$OUT" "$PY" - <<'EOF'
import csv, json, os, platform
from pathlib import Path
import torch
from latentlm.device import describe, resolve_device

out = Path(os.environ["OUT"])
def last_json(name):
    path = out / name
    lines = [l for l in path.read_text().splitlines() if l.startswith("{")] if path.is_file() else []
    return json.loads(lines[-1]) if lines else None
train, ev = last_json("train.json"), last_json("evaluate.json")
rows = []
if (out / "vae" / "metrics.csv").is_file():
    with open(out / "vae" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "train"]
summary = {
    "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "device": describe(resolve_device("auto")),
    "cuda_tests": ("failed (pytest exit %s)" % os.environ["TESTS_RC"] if os.environ["TESTS_RC"] != "0"
                   else "passed" if torch.cuda.is_available() else "skipped (no GPU)"),
    "device_tests": "passed" if os.environ["DEVICE_TESTS_RC"] == "0" else f"failed (pytest exit {os.environ['DEVICE_TESTS_RC']})",
    "train": train, "train_seconds": int(os.environ["TRAIN_S"]),
    "train_tokens_per_s_last": float(rows[-1]["tokens_per_s"]) if rows else None,
    "evaluate": ev and {k: ev[k] for k in ("device", "examples", "nll", "ppl", "elbo", "kl", "mi", "au", "samples",
                                            "precision") if k in ev},
    "evaluate_seconds": int(os.environ["EVAL_S"]), "total_seconds": int(os.environ["TOTAL_S"]),
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
ran = (train or {}).get("device"), (ev or {}).get("device")
print(f"\ntraining ran on {ran[0]}, evaluation on {ran[1]}; summary in {out / 'gpu_check.json'}")
EOF

status=0
for rc in "$tests_rc" "$device_tests_rc" "$train_rc" "$eval_rc"; do [ "$rc" = 0 ] || status=1; done
[ "$status" = 0 ] && echo "gpu-check: OK" || echo "gpu-check: FAILED (tests $tests_rc/$device_tests_rc, train $train_rc, evaluate $eval_rc)"
exit $status
