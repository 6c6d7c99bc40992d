r"""Entry point: flags only. Everything else lives in the importable `tvr_jax.train` library.

  python -m tvr_jax.main --config=configs/msvd.py --workdir=runs/msvd [--config.key=value ...]

Multi-host: set `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or run under
SLURM / on a TPU pod where `jax.distributed.initialize()` discovers them itself
(`--distributed=auto`). See docs/training.md.
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Experiment config file (configs/*.py[:arg]); override keys with --config.key=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, logs and evaluation JSON.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "env", ["env", "auto", "off"],
    "env: call jax.distributed.initialize() when a coordinator is given (flags or "
    "JAX_COORDINATOR_ADDRESS); auto: always call it (SLURM, TPU pods, Open MPI discover their own "
    "settings); off: never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_LOCAL_DEVICES = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated local device ids this process uses (GPU clusters).")

flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed(mode: str, coordinator: str | None, num_processes: int | None,
                                 process_id: int | None, local_device_ids: str | None) -> bool:
  """Calls `jax.distributed.initialize` when configured; returns whether it did.

  Must run before any other JAX call touches the devices.
  """
  import jax
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if mode == "off" or (mode == "env" and not coordinator):
    return False
  kwargs = {}
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if num_processes is not None:
    kwargs["num_processes"] = num_processes
  if process_id is not None:
    kwargs["process_id"] = process_id
  if local_device_ids:
    kwargs["local_device_ids"] = [int(x) for x in local_device_ids.split(",")]
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    # Multi-process CPU runs (tests, debugging) need a collectives backend for cross-process ops.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected command-line arguments: {argv[1:]}")
  from tvr_jax import reporting   # quiet console from the first line: library INFO logs need -v 1
  reporting.setup_logging(None, reporting.console_verbosity())
  maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value, _LOCAL_DEVICES.value)
  import jax
  from tvr_jax import checkpointing
  from tvr_jax import train
  from tvr_jax.data import datasets

  logging.info("JAX %s, process %d of %d, %d local / %d global devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, datasets.MissingInputError) as e:
    # Raised before any device work or file write: the message is the whole story.
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  except checkpointing.CheckpointError as e:
    # A refused or damaged checkpoint, a failed write (full disk), a non-finite state: the message
    # names the directory and what to do (tracebacks are in WORKDIR/log.txt).
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)


def _unknown_key_message(error: Exception, argv: list[str]) -> str:
  """One readable line for an unknown `--config.key` (ml_collections' own message nests quotes)."""
  text = str(error).replace("\\", "")
  names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
  key = names[0] if names else text
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  bad = [a for a in overrides if key in re.split(r"[.=]", a.split("=", 1)[0])]
  arg = bad[0] if bad else " ".join(overrides) or " ".join(argv[1:])
  dotted = arg.split("=", 1)[0][len("--config."):] if bad else key
  message = f"error: unknown config key {dotted!r} in {arg}"
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  if suggestion:
    message += f"; did you mean {dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}" \
               f"{suggestion.group(1)}?"
  return message + " (every key is declared in configs/base.py)\n"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error for a bad `--config.key=value` override."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:   # ml_collections: the key does not exist
    sys.stderr.write(_unknown_key_message(e, argv))
    sys.exit(2)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
