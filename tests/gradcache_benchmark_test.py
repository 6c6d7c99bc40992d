"""Smoke test of benchmarks/gradcache.py: its tiny mode runs and prints the table and summary."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_gradcache_benchmark_tiny_prints_memory_rows_and_step_ratio():
  out = subprocess.run([sys.executable, "-m", "benchmarks.gradcache", "--tiny"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=1200, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  rows = [line.split() for line in lines
          if line.startswith("[memory] tiny-64 batch 16 accum_steps=")]
  assert len(rows) == 2, out.stdout   # accum_steps 1 and 4
  peaks = [float(r[r.index("peak") + 1]) for r in rows]
  assert all(p > 0 for p in peaks), rows
  (summary,) = [line for line in lines if line.startswith("summary: ")]
  assert "k=1" in summary and "k=4" in summary and "step time k=4 / k=1 at batch 16" in summary
  (timing,) = [line for line in lines if line.startswith("step time at batch 16")]
  ratio = float(timing.split("ratio ")[1].split()[0])
  assert ratio > 0, timing
  # Both programs took the same first step from the same state on the same batch.
  losses = [float(x) for x in timing.split("losses ")[1].split(" / ")]
  assert abs(losses[0] - losses[1]) <= 1e-3 * abs(losses[0]), timing
