"""Smoke test of benchmarks/head_precision.py: its smallest run prints both rows and a summary."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_head_precision_benchmark_prints_both_settings():
  out = subprocess.run([sys.executable, "-m", "benchmarks.head_precision", "--batch", "4",
                        "--words", "8", "--frames", "3", "--dim", "32", "--repeats", "1"],
                       cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
          if line.startswith(("highest", "default"))}
  assert set(rows) == {"highest", "default"}, out.stdout
  assert rows["highest"][-1] == rows["default"][-1]  # same loss on the CPU
  summary = [line for line in out.stdout.splitlines() if line.startswith("summary: ")]
  assert len(summary) == 1 and "highest / default" in summary[0], out.stdout
