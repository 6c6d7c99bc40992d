"""What a run tells its user: a few console lines, a complete log file, TensorBoard scalars.

The console gets a short run header, the progress bar, periodic metric lines and the evaluation
table (`say`). Everything else (library INFO logs from Orbax, TFDS, absl; the full config; the
parameter table) goes to files in the work directory, so a quiet console loses nothing:

    WORKDIR/log.txt            every log record at INFO and above (log_p<i>.txt on process i > 0)
    WORKDIR/tensorboard/       scalars, with tag names TensorBoard accepts

`setup_logging(workdir, verbosity)`: library INFO logs reach the console only with verbosity >= 1
(`--verbosity=1`); warnings and errors always do.
"""

from __future__ import annotations

import logging as py_logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

_FILE_HANDLER_NAME = "tvr_jax-workdir-log"
_TAG_ILLEGAL = re.compile(r"[^\w./-]")


def console_verbosity() -> int:
  """The verbosity the user asked for: absl's `--verbosity` when given explicitly, else 0.

  (absl's app.run turns its default into INFO; here the default console stays quiet.)
  """
  from absl import flags
  flag = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
  if flag is None or not flags.FLAGS.is_parsed() or flag.using_default_value:
    return 0
  return int(flag.value)


def setup_logging(workdir: str | None, verbosity: int = 0) -> str | None:
  """Routes INFO logs to `workdir/log.txt` and, only when `verbosity >= 1`, to the console.

  Safe to call again (a second run in the same process replaces the file handler). Returns the
  log file's path (None without a workdir).
  """
  absl_logger = logging.get_absl_logger()
  absl_logger.setLevel(py_logging.DEBUG if verbosity >= 2 else py_logging.INFO)
  console_level = py_logging.INFO if verbosity >= 1 else py_logging.WARNING
  logging.get_absl_handler().setLevel(console_level)
  root = py_logging.getLogger()
  for h in list(root.handlers):
    if h.get_name() == _FILE_HANDLER_NAME:
      root.removeHandler(h)
      h.close()
  if not workdir:
    return None
  os.makedirs(workdir, exist_ok=True)
  name = "log.txt" if jax.process_index() == 0 else f"log_p{jax.process_index()}.txt"
  path = os.path.join(workdir, name)
  handler = py_logging.FileHandler(path)
  handler.set_name(_FILE_HANDLER_NAME)
  handler.setLevel(py_logging.INFO)
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname).1s %(module)s] %(message)s"))
  root.addHandler(handler)   # the absl logger propagates to the root logger
  return path


def say(message: str) -> None:
  """One console line for the user (process 0 only), also written to the log file.

  Uses `tqdm.write` so an active progress bar is redrawn below the line instead of torn.
  """
  logging.info("%s", message)
  if jax.process_index() != 0:
    return
  from tqdm import tqdm
  tqdm.write(message)


def tensorboard_tag(name: str) -> str:
  """A TensorBoard-legal tag: "eval/t2v/R@1" -> "eval/t2v/R1" (no renaming warning)."""
  return _TAG_ILLEGAL.sub("_", name.replace("@", ""))


def summary_writer(workdir: str) -> Any:
  """A tensorboardX writer under `workdir/tensorboard` on process 0, None elsewhere."""
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def write_scalars(writer: Any, step: int, scalars: Mapping[str, Any]) -> None:
  """Writes the finite numeric entries of `scalars` at `step` (no-op without a writer)."""
  if writer is None:
    return
  for k, v in scalars.items():
    if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)):
      writer.add_scalar(tensorboard_tag(k), float(v), step)
  writer.flush()
