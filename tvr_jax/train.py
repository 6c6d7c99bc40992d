"""The train-and-evaluate loop, narrated in sections.

  logging → mesh → input → model and optimizer → sharding → update step → checkpoint →
  evaluators → loop

`train_and_evaluate(config, workdir)` is the whole program; `tvr_jax.main` only parses flags. The
pieces it uses (`create_train_state`, `make_train_step`) are public so tests, benchmarks and
notebooks can drive one step without the loop.

The train state is a plain dict of arrays (a pytree Orbax and `jax.jit` handle directly):

  params           the model's `nnx.Param`s as a pure nested dict (float32 master weights)
  rest             the model's other variables (omitted when there are none)
  opt_state        the optax state
  step             int32 scalar, optimizer steps taken
  rng              uint32 key data; the step's key is fold_in(rng, step), so resuming needs no RNG
                   bookkeeping beyond this value
  first_nonfinite  int32 scalar, the first step whose loss or gradients were not finite (-1: none);
                   kept on device so checking it costs no per-step host sync
  nonfinite_steps  int32 scalar, how many steps were not finite (skipped with nan_policy='skip')

The model is rebuilt from its `nnx.GraphDef` inside the jitted step (`nnx.merge`), which keeps the
step a plain `jax.jit` function with a donated state (cheaper per call than `nnx.jit`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from tvr_jax import checkpointing
from tvr_jax import data as data_lib
from tvr_jax import evaluate as evaluate_lib
from tvr_jax import optimizer as optimizer_lib
from tvr_jax import reporting
from tvr_jax import sharding
from tvr_jax.data import datasets
from tvr_jax.models import build as build_lib

PyTree = Any
State = dict[str, Any]


# ==================================================================================================
# Config checks: fail before any device work or any file is written, naming the key.
# ==================================================================================================
class ConfigError(ValueError):
  """A run config value that cannot work; raised before any device work or file write."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for unsupported values, before the run touches devices or the workdir.

  Unknown keys cannot reach here: config files build on `configs.base.get_base_config()`, which
  returns a locked ConfigDict, so a typo fails on the line (or `--config.key=value`) that writes it.
  """
  if config.mode not in ("train", "eval"):
    raise ConfigError(f"config.mode={config.mode!r}: use 'train' or 'eval'")
  if config.nan_policy not in ("stop", "skip"):
    raise ConfigError(f"config.nan_policy={config.nan_policy!r}: use 'stop' or 'skip'")
  if config.accum_steps != 1:
    raise ConfigError(
        f"config.accum_steps={config.accum_steps} is not supported: accumulating gradients over "
        "micro-batches would compute NegNCE / InfoNCE / TPM-CL over each micro-batch, i.e. with "
        f"1/{config.accum_steps} of the negatives, which is a different objective from the "
        "global-batch recipe. Use more devices (the global batch is split over them and the loss "
        "still spans it) or `remat=True` / `dtype='bfloat16'` to fit the batch in memory. "
        "See docs/training.md.")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'")
  try:
    build_lib.retrieval_config(config)   # the model's own checks (header, loss, partial type)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from e


def train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The endless, checkpointable iterator of global training batches."""
  split = datasets.open_split(config, config.train_split)
  return data_lib.TrainIterator(
      split, global_batch_size=config.batch_size, caption_mode=config.train_caption_mode,
      context_length=config.max_words, seed=config.seed, sharding=sharding.batch_sharding(mesh),
      worker_count=config.num_workers, cache=datasets.frame_cache(config, split))


# ==================================================================================================
# Train state: created already sharded.
# ==================================================================================================
@dataclasses.dataclass
class TrainSetup:
  """Everything `make_train_step` and the loop need besides the state."""
  graphdef: Any
  tx: optax.GradientTransformation
  schedules: dict[str, optax.Schedule]
  shardings: PyTree
  meta: dict[str, Any]
  has_rest: bool


def _split(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _merge(graphdef, params, rest):
  return nnx.merge(graphdef, params, rest if rest is not None else {})


def _plan_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, total_steps: int,
                      model_fn: Callable[..., nnx.Module]):
  """(abstract state, TrainSetup, assemble(params, rest), init_from_scratch()): all still abstract."""
  abstract_model = nnx.eval_shape(lambda: model_fn(config, load_weights=False))
  graphdef, abstract_params, abstract_rest = _split(abstract_model)
  tx, schedules = optimizer_lib.build(config.optimizer.to_dict(), total_steps, abstract_params)
  has_rest = bool(jax.tree.leaves(abstract_rest))

  def assemble(params, rest):
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(config.seed)),
             "first_nonfinite": jnp.full((), -1, jnp.int32),
             "nonfinite_steps": jnp.zeros((), jnp.int32)}
    if has_rest:
      state["rest"] = rest
    return state

  def init_from_scratch():
    _, params, rest = _split(model_fn(config, load_weights=False))
    return assemble(params, rest)

  rules = [tuple(r) for r in config.sharding_rules]
  abstract, shardings = sharding.abstract_sharded(init_from_scratch, mesh, rules,
                                                  config.min_fsdp_size)
  setup = TrainSetup(graphdef, tx, schedules, shardings, build_lib.model_meta(config, abstract_model),
                     has_rest)
  return abstract, setup, assemble, init_from_scratch


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         total_steps: int, model_fn: Callable[..., nnx.Module] | None = None
                         ) -> tuple[State, TrainSetup]:
  """The train state as ShapeDtypeStructs (shapes, dtypes, shardings) and its TrainSetup.

  Nothing runs on a device and no weights are read, so this works on compile-only devices
  (ahead-of-time compilation for absent accelerators) exactly as on real ones; `create_train_state`
  materialises this same layout.
  """
  abstract, setup, _, _ = _plan_train_state(config, mesh, total_steps,
                                            model_fn or build_lib.build_model)
  return abstract, setup


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, total_steps: int,
                       model_fn: Callable[..., nnx.Module] | None = None) -> tuple[State, TrainSetup]:
  """Builds the train state on `mesh`, every leaf placed by `config.sharding_rules`.

  From scratch the whole state is created inside `jax.jit(..., out_shardings=...)`, so no device
  ever holds more than its shards. With `config.init_from`, the converted CLIP is read on the host
  once, the model built around it and each leaf sent straight to its shards.

  Args:
    config: the run config.
    mesh: the device mesh.
    total_steps: optimizer steps of the run (the lr schedule's length).
    model_fn: `model_fn(config, load_weights=bool) -> nnx.Module`; default
      `tvr_jax.models.build.build_model`.
  """
  model_fn = model_fn or build_lib.build_model
  _, setup, assemble, init_from_scratch = _plan_train_state(config, mesh, total_steps, model_fn)
  shardings = setup.shardings
  if config.init_from:
    _, params, rest = _split(model_fn(config, load_weights=True))
    params = jax.device_put(params, shardings["params"])
    rest = jax.device_put(rest, shardings["rest"]) if setup.has_rest else rest
    state = jax.jit(assemble, out_shardings=shardings)(params, rest)
  else:
    state = jax.jit(init_from_scratch, out_shardings=shardings)()
  return state, setup


# ==================================================================================================
# Update step.
# ==================================================================================================
def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(setup: TrainSetup, mesh: jax.sharding.Mesh, *, nan_policy: str = "stop",
                    clamp_logit_scale: bool = True) -> Callable[[State, dict], tuple[State, dict]]:
  """The jitted update: loss and gradients on the global batch, optimizer, finiteness bookkeeping.

  The batch arrays are global `jax.Array`s sharded over the mesh's data axes; the model computes the
  similarity matrix on them as if on one device (`S = text @ video.T` over the whole batch) and the
  compiler inserts the all-gathers, so every device's loss sees all B negatives.

  With `nan_policy="skip"` a step whose loss or gradients are not finite leaves parameters and
  optimizer state unchanged (the step counter still advances); with "stop" the update is applied
  and the loop raises at its next check, naming the step (`first_nonfinite`).
  """
  graphdef, tx = setup.graphdef, setup.tx
  schedules = list(setup.schedules.items())
  batch_spec = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  gather = sharding.gather_to_all(mesh)

  def step_fn(state: State, batch: dict) -> tuple[State, dict]:
    # The model is deterministic today (no dropout); a stochastic one would take
    # jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]).
    rest = state.get("rest")

    def loss_fn(params):
      model = _merge(graphdef, params, rest)
      total, terms = model.loss(batch, gather=gather)
      return total, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if clamp_logit_scale:
      params = optimizer_lib.clamp_logit_scale(params)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    if nan_policy == "skip":
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
      params = keep(params, state["params"])
      opt_state = keep(opt_state, state["opt_state"])
    first = jnp.where((state["first_nonfinite"] < 0) & ~finite, state["step"], state["first_nonfinite"])
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1,
                     first_nonfinite=first.astype(jnp.int32),
                     nonfinite_steps=state["nonfinite_steps"] + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()},
               "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
               "skipped": (~finite).astype(jnp.int32),
               "nonfinite_steps_total": new_state["nonfinite_steps"]}
    for i, (pattern, schedule) in enumerate(schedules):
      metrics[f"lr/group{i}"] = schedule(state["step"])
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(setup.shardings, batch_spec),
                 out_shardings=(setup.shardings, replicated), donate_argnums=(0,))


# ==================================================================================================
# Helpers of the loop.
# ==================================================================================================
class _Preemption:
  """SIGTERM handler: remembers the signal so the loop can save and exit between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting after this step")
    self.requested = True

  def any_process(self) -> bool:
    """True if any process got SIGTERM (all processes must take the same branch)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([int(self.requested)], np.int32))
    return bool(np.asarray(flags).any())

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
  """The loss or a gradient became NaN/inf (config.nan_policy='stop')."""


def _check_finite(state: State, config) -> None:
  first = int(jax.device_get(state["first_nonfinite"]))
  if first >= 0 and config.nan_policy == "stop":
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {first} (0-based optimizer step); stopping without "
        "saving. Lower the learning rate, check the input data, or set --config.nan_policy=skip to "
        "skip such updates.")


def num_train_steps(config, examples_per_epoch: int) -> tuple[int, int]:
  """(total optimizer steps, steps per epoch) for `config`; partial last batches are dropped."""
  steps_per_epoch = max(examples_per_epoch // config.batch_size, 1)
  if config.num_train_steps > 0:
    return int(config.num_train_steps), steps_per_epoch
  return int(config.num_epochs * steps_per_epoch), steps_per_epoch


def _run_header(config, mesh, train_data, evaluator, state, total_steps: int,
                steps_per_epoch: int, eval_every: int, workdir: str) -> list[str]:
  """The few lines a user reads before the progress bar: devices, data, model, schedule."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  m = config.model
  clip = (f"CLIP from {config.init_from}" if config.init_from
          else f"CLIP {config.clip_preset} from scratch")
  loss = {"negnce": "NegNCE", "infonce": "InfoNCE"}.get(m.contrastive_loss, m.contrastive_loss)
  tpm = f" + TPM-CL type {m.partial_type}" if m.partial_type else ""
  lines = [f"devices: {len(devices)} x {'/'.join(kinds)} over {jax.process_count()} process(es), "
           f"mesh {dict(mesh.shape)}"]
  if train_data is not None:
    lines.append(f"train: {config.dataset}:{config.train_split}, {train_data.num_examples} "
                 f"examples ({config.train_caption_mode} captions), {config.num_frames} frames x "
                 f"{config.image_size} px, {config.max_words} tokens")
  lines.append(f"eval: {evaluator.split.name}:{evaluator.split.split}, {evaluator.data.num_videos} "
               f"videos, {evaluator.data.num_captions} captions")
  lines.append(f"model: {clip}, {n_params / 1e6:.2f}M parameters, header {m.header}, "
               f"{loss}{tpm}, textual attention {'on' if m.textual_attention else 'off'}, visual "
               f"attention {'on' if m.visual_attention else 'off'}, {config.dtype}")
  if train_data is not None:
    when = ("at the end" if eval_every <= 0 else
            "every epoch and at the end" if eval_every == steps_per_epoch else
            f"every {eval_every} steps and at the end")
    lines.append(f"schedule: {total_steps} steps ({steps_per_epoch} per epoch), global batch "
                 f"{config.batch_size}, evaluation {when}")
  lines.append(f"workdir: {workdir} (log.txt, config_{config.mode}.json, params.txt, tensorboard/)")
  return lines


def _write_run_files(config, state, workdir: str) -> None:
  """The full config and the parameter table (path, shape, sharding), for the record."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, f"config_{config.mode}.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  with open(os.path.join(workdir, "params.txt"), "w") as f:
    f.write(f"{n_params} parameters ({n_params / 1e6:.2f}M)\n{sharding.describe(state['params'])}\n")


def _metric_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
  """`step 96/480 (epoch 2.0): loss 9.12 (negnce 8.7, tpm 0.42), grad_norm 3.1, 210 clips/s`."""
  parts = [f"{k.split('/', 1)[1]} {v:.4g}" for k, v in sorted(metrics.items())
           if k.startswith("loss/") and k.count("/") == 1]
  return (f"step {step}/{total} (epoch {metrics['epoch']:.1f}): loss {metrics['loss']:.4g} "
          f"({', '.join(parts)}), grad_norm {metrics['grad_norm']:.3g}, "
          f"{metrics['clips_per_s']:.1f} clips/s")


# ==================================================================================================
# train_and_evaluate.
# ==================================================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or, with config.mode='eval', only evaluates) and returns the last evaluation's metrics."""
  # ---- checks: nothing touches devices or the workdir before the config and inputs are valid ------
  validate_config(config)
  workdir = os.path.abspath(workdir)
  datasets.check_inputs(config)

  # ---- mesh ------------------------------------------------------------------------------------
  # One mesh for the whole run; the batch is split over ('data', 'fsdp'), parameters over 'fsdp'.
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_batch_size(config.batch_size, mesh)

  # ---- logging ---------------------------------------------------------------------------------
  # Console: a header, the progress bar, metric lines, evaluation tables. Everything else goes to
  # WORKDIR/log.txt (library INFO logs reach the console with --verbosity=1).
  os.makedirs(workdir, exist_ok=True)
  log_path = reporting.setup_logging(workdir, reporting.console_verbosity())
  logging.info("config:\n%s", config)
  logging.info("mesh %s over %d devices (%d processes); log file %s", dict(mesh.shape),
               jax.device_count(), jax.process_count(), log_path)
  writer = reporting.summary_writer(workdir)

  # ---- input -----------------------------------------------------------------------------------
  # Each process reads its own 1/process_count of every global batch; data_lib assembles global
  # arrays with jax.make_array_from_process_local_data. The iterator's state is checkpointed.
  train_data = None
  if config.mode == "train":
    train_data = train_iterator(config, mesh)
    total_steps, steps_per_epoch = num_train_steps(config, train_data.num_examples)
  else:
    total_steps, steps_per_epoch = 1, 1
  eval_every = steps_per_epoch if config.eval_every < 0 else config.eval_every

  # ---- model and optimizer, created already sharded ---------------------------------------------
  state, setup = create_train_state(config, mesh, total_steps)

  # ---- checkpoint: resume if the workdir has one -------------------------------------------------
  # Evaluation opens checkpoints read-only: it may run beside the training that writes them.
  ckpt_dir, restore_step = os.path.join(workdir, "checkpoints"), None
  if config.mode == "eval" and config.eval_checkpoint:
    ckpt_dir, name = os.path.split(os.path.normpath(os.path.abspath(config.eval_checkpoint)))
    if not name.isdigit() or not os.path.isdir(config.eval_checkpoint):
      raise FileNotFoundError(f"config.eval_checkpoint={config.eval_checkpoint!r} is not a checkpoint "
                              "step directory (expected WORKDIR/checkpoints/<step>)")
    restore_step = int(name)
  if config.mode == "eval" and not os.path.isdir(ckpt_dir):
    ckpt = None
  else:
    ckpt = checkpointing.TrainCheckpointManager(
        ckpt_dir, keep=config.keep_checkpoints, best_metric=config.best_metric,
        async_save=config.async_checkpoints, read_only=config.mode == "eval")
    if restore_step is None:
      restore_step = ckpt.latest_step()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  if restore_step is not None:
    reporting.say(f"resuming from checkpoint {ckpt.step_dir(restore_step)}")
    state, data_state, _ = ckpt.restore(restore_step, abstract, setup.meta)
    if train_data is not None and data_state is not None:
      train_data.set_state(data_state)
  _write_run_files(config, state, workdir)   # only once the checkpoint (if any) was accepted

  # ---- evaluators --------------------------------------------------------------------------------
  evaluator = evaluate_lib.Evaluator(config, mesh, setup.graphdef, has_rest=setup.has_rest,
                                     workdir=workdir, writer=writer)
  for line in _run_header(config, mesh, train_data, evaluator, state, total_steps,
                          steps_per_epoch, eval_every, workdir):
    reporting.say(line)
  if config.mode == "eval":
    metrics = evaluator.run(state, step=int(jax.device_get(state["step"])))
    if ckpt is not None:
      ckpt.close()
    if writer is not None:
      writer.close()
    return metrics

  # ---- update step -------------------------------------------------------------------------------
  train_step = make_train_step(setup, mesh, nan_policy=config.nan_policy,
                               clamp_logit_scale=config.optimizer.clamp_logit_scale)

  # ---- loop --------------------------------------------------------------------------------------
  step = int(jax.device_get(state["step"]))
  last_metrics: dict[str, float] = {}
  progress = None
  if config.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
  t_log, step_log = time.perf_counter(), step
  # Console metric lines at most once per epoch (the progress bar shows loss and clips/s live);
  # every `log_every` steps go to the log file and TensorBoard.
  console_every = max(config.log_every, steps_per_epoch)
  try:
    with _Preemption() as preemption:
      while step < total_steps:
        batch = next(train_data)
        state, metrics = train_step(state, batch)
        step += 1
        if progress is not None:
          progress.update(1)
        is_last = step == total_steps
        if step % config.log_every == 0 or is_last:
          _check_finite(state, config)
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          metrics["clips_per_s"] = config.batch_size * (step - step_log) / max(now - t_log, 1e-9)
          metrics["steps_per_s"] = (step - step_log) / max(now - t_log, 1e-9)
          metrics["epoch"] = step / steps_per_epoch
          t_log, step_log = now, step
          logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
          if progress is not None:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", clips_s=f"{metrics['clips_per_s']:.1f}")
          if step % console_every == 0 or is_last:
            reporting.say(_metric_line(step, total_steps, metrics))
          reporting.write_scalars(writer, step, {f"train/{k}": v for k, v in metrics.items()})
        eval_metrics = None
        if is_last or (eval_every > 0 and step % eval_every == 0):
          _check_finite(state, config)
          eval_metrics = evaluator.run(state, step=step)
          last_metrics = eval_metrics
          t_log = time.perf_counter()  # evaluation time is not training throughput
        preempted = preemption.any_process()
        if is_last or preempted or step % config.checkpoint_every == 0:
          _check_finite(state, config)   # never checkpoint a NaN state
          ckpt.save(step, state, data_state=train_data.get_state(), metrics=eval_metrics,
                    meta=setup.meta)
        if preempted:
          reporting.say(f"stopping at step {step} after SIGTERM; resume with the same command")
          break
  finally:
    # Also on errors (NaN stop, KeyboardInterrupt): finish pending checkpoint writes, stop workers.
    if progress is not None:
      progress.close()
    ckpt.close()
    train_data.close()
    if writer is not None:
      writer.close()
  return last_metrics

