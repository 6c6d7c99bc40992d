"""Shared helpers of the benchmarks: timing (warm-up, median of N), machine string, tables.

Every benchmark reports a median over repeated calls after warm-up calls that are not counted, so
compilation and first-call allocation never enter a rate; compile time is reported on its own.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Callable, Sequence

import numpy as np


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo and the core count, e.g. 'AMD EPYC ... (2 cores)'."""
  name = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name} ({os.cpu_count()} cores)"


def machine() -> str:
  """Accelerator (when JAX sees one) or CPU description of this machine, for the tables."""
  import jax
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{jax.device_count()} x {dev.device_kind} ({dev.platform}); host {cpu_model()}"
  return f"CPU only: {cpu_model()}"


def today() -> str:
  """UTC date and time of the run, e.g. '2026-11-27 19:30 UTC'."""
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def status_kib(field: str) -> int:
  """A kiB field of /proc/self/status (e.g. "VmRSS", "VmHWM").

  -1 where there is none (not Linux).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return -1


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux `clear_refs` 5), so a later VmHWM is this part's peak.

  Returns False where the kernel does not allow it (then VmHWM is the whole process's peak).
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               sync: Callable[[object], object] | None = None) -> dict:
  """Calls `fn` `warmup` times untimed, then `repeats` times timed; returns median/min/max seconds.

  Args:
    fn: the call to time; its result is passed to `sync` before the clock stops.
    repeats: timed calls (>= 1); the median of these is the figure reported.
    warmup: untimed calls first (compilation, allocator warm-up).
    sync: waits for the result (e.g. `jax.block_until_ready`); None = `fn` is synchronous.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for _ in range(warmup):
    out = fn()
    if sync is not None:
      sync(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    if sync is not None:
      sync(out)
    times.append(time.perf_counter() - t0)
  return {"median": float(np.median(times)), "min": float(min(times)), "max": float(max(times)),
          "n": repeats, "times": times}


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  """Prints rows as a left-aligned text table under `header` (cells are str()-ed)."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
  print(line(cells[0]))
  print("  ".join("-" * w for w in widths))
  for r in cells[1:]:
    print(line(r))
