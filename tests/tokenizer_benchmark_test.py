"""Smoke test of benchmarks/tokenizer.py: a tiny run prints every tokenizer's row and checks ids."""

import subprocess
import sys

import pytest

from benchmarks import tokenizer as bench
from conftest import REPO_ROOT


def test_tiny_run_prints_all_tokenizers_with_open_clip_ids():
  out = subprocess.run([sys.executable, "-m", "benchmarks.tokenizer", "--captions", "30",
                        "--repeats", "1", "--sets", "plain"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  cpu = [line for line in lines if line.startswith("CPU: ")]
  assert len(cpu) == 1 and "cores)" in cpu[0] and "load average" in cpu[0], out.stdout
  rows = {line.split()[1]: line.split() for line in lines if line.startswith("plain ")}
  assert set(rows) == set(bench.IMPLEMENTATIONS), out.stdout
  assert "git f514d89" in " ".join(rows["hand-written"])
  for name, cells in rows.items():
    assert cells[-1] == "yes", f"{name} ids differ from open_clip's: {cells}"
    # import, build, first call seconds, then cold, warm, warm-per-CPU captions/s.
    numbers = [float(c.replace(",", "")) for c in cells[-7:-1]]
    assert min(numbers[3:]) > 0 and min(numbers[:3]) >= 0, cells
  summary = [line for line in lines if line.startswith("summary: ")]
  assert len(summary) == 1 and all(n in summary[0] for n in bench.IMPLEMENTATIONS), out.stdout


def test_caption_sets_are_reproducible_and_differ():
  plain, messy = bench.captions("plain", 200), bench.captions("messy", 200)
  assert plain == bench.captions("plain", 200) and len(set(plain)) > 150
  assert all(c.isascii() for c in plain)
  assert sum(not c.isascii() for c in messy) > 150 and any("&" in c for c in messy)
  with pytest.raises(ValueError, match="bogus"):
    bench.captions("bogus", 1)


def test_unknown_set_is_a_clear_error():
  out = subprocess.run([sys.executable, "-m", "benchmarks.tokenizer", "--sets", "plain,bogus"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2 and "bogus" in out.stderr
