"""The peer benchmark (benchmarks/bench_vae_peer.py) skips cleanly when no peer checkout is given."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vae_peer.py"


def test_without_a_peer_checkout_the_benchmark_says_so_and_exits_0(tmp_path):
    for args in ([], ["--peer", str(tmp_path / "missing")]):
        done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "skipping" in done.stdout
