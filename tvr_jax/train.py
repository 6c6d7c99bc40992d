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
import json
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
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
from tvr_jax import gradcache
from tvr_jax import health
from tvr_jax import losses
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
  if config.saturation_policy not in health.POLICIES or config.saturation_window < 1:
    raise ConfigError(f"config.saturation_policy={config.saturation_policy!r} / saturation_window="
                      f"{config.saturation_window}: use one of {health.POLICIES} and >= 1 step")
  _check_accum_steps(config)
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'")
  try:
    build_lib.retrieval_config(config)   # the model's own checks (header, loss, partial type)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from e


def _check_accum_steps(config: ml_collections.ConfigDict) -> None:
  """accum_steps (gradient caching): a positive integer that splits the global batch evenly.

  Every micro-batch spreads over all data-parallel shards, so the global batch must be a multiple
  of accum_steps x shards. The shard count comes from `config.mesh` over the visible devices; a
  mesh that does not fit them is reported by `sharding.make_mesh`, and the compiled step checks
  the batch it gets again.
  """
  if config.accum_steps == 1:
    return
  try:
    shards = math.prod(sharding.mesh_shape(config.mesh.to_dict(), jax.device_count()))
  except ValueError:
    shards = 1
  try:
    gradcache.check_split(config.batch_size, config.accum_steps, shards)
  except ValueError as e:
    raise ConfigError(f"config.accum_steps={config.accum_steps!r}, config.batch_size="
                      f"{config.batch_size}: {e}") from e


def train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The endless, checkpointable iterator of global training batches."""
  split = datasets.open_split(config, config.train_split)
  return data_lib.TrainIterator(
      split, global_batch_size=config.batch_size, caption_mode=config.train_caption_mode,
      context_length=config.max_words, seed=config.seed, sharding=sharding.batch_sharding(mesh),
      worker_count=config.num_workers, cache=datasets.frame_cache(config, split),
      keyword_weighting=bool(config.model.keyword_weighting))


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
  """(abstract state, TrainSetup, assemble(params, rest), init_from_scratch()), all abstract."""
  abstract_model = nnx.eval_shape(lambda: model_fn(config, load_weights=False))
  graphdef, abstract_params, abstract_rest = _split(abstract_model)
  tx, schedules = optimizer_lib.build(config.optimizer.to_dict(), total_steps, abstract_params,
                                     frozen=abstract_model.untrained_params())
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
  setup = TrainSetup(graphdef, tx, schedules, shardings,
                     build_lib.model_meta(config, abstract_model), has_rest)
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
                       model_fn: Callable[..., nnx.Module] | None = None
                       ) -> tuple[State, TrainSetup]:
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


def train_step_for(config: Any, setup: TrainSetup, mesh: jax.sharding.Mesh, *,
                   unroll_microbatches: bool = False
                   ) -> Callable[[State, dict], tuple[State, dict]]:
  """The update step `config` asks for (NaN policy, logit-scale clamp, gradient caching).

  The trainer and the ahead-of-time compiler (`tvr_jax.aot`) both build their step here, so what
  is compiled for an accelerator is what trains (`unroll_microbatches`: see `make_train_step`).
  """
  return make_train_step(setup, mesh, nan_policy=config.nan_policy,
                         clamp_logit_scale=config.optimizer.clamp_logit_scale,
                         accum_steps=config.accum_steps, unroll_microbatches=unroll_microbatches)


def make_train_step(setup: TrainSetup, mesh: jax.sharding.Mesh, *, nan_policy: str = "stop",
                    clamp_logit_scale: bool = True,
                    accum_steps: int = 1, unroll_microbatches: bool = False
                    ) -> Callable[[State, dict], tuple[State, dict]]:
  """The jitted update: loss and gradients on the global batch, optimizer, finiteness bookkeeping.

  The batch arrays are global `jax.Array`s sharded over the mesh's data axes; the model computes the
  similarity matrix on them as if on one device (`S = text @ video.T` over the whole batch) and the
  compiler inserts the all-gathers, so every device's loss sees all B negatives.

  With `accum_steps` k > 1 the same loss and gradients come from exact gradient caching
  (`tvr_jax.gradcache`): the towers run on k micro-batches of B/k (twice: features, then their
  gradients), the head once on the whole batch; one optimizer step. B must be a multiple of
  k x the data-parallel shards (ConfigError when the step is first traced).

  `unroll_microbatches` unrolls the two micro-batch loops (the same values, one HLO copy of the
  towers per micro-batch): only for counting FLOPs, since XLA's cost analysis counts a loop body
  once (`tvr_jax.aot`).

  With `nan_policy="skip"` a step whose loss or gradients are not finite leaves parameters and
  optimizer state unchanged (the step counter still advances); with "stop" the update is applied
  and the loop raises at its next check, naming the step (`first_nonfinite`).
  """
  if not isinstance(accum_steps, int) or isinstance(accum_steps, bool) or accum_steps < 1:
    raise ConfigError(f"config.accum_steps={accum_steps!r}: use a positive integer")
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
      total, terms = model.loss(batch, health=True, gather=gather)
      return total, terms

    if accum_steps == 1:
      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    else:
      batch_size = jax.tree.leaves(batch)[0].shape[0]
      try:
        gradcache.check_split(batch_size, accum_steps, sharding.data_parallel_size(mesh))
      except ValueError as e:
        raise ConfigError(f"config.accum_steps={accum_steps}: {e}") from e
      (loss, terms), grads = gradcache.value_and_grad(
          lambda p: _merge(graphdef, p, rest), state["params"], batch, accum_steps, mesh=mesh,
          param_shardings=setup.shardings["params"], loss_kwargs={"health": True},
          unroll=unroll_microbatches)
    saturated = terms.pop(losses.SATURATION_KEY)   # a health indicator, not a loss term
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if clamp_logit_scale:
      params = optimizer_lib.clamp_logit_scale(params)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    if nan_policy == "skip":
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
      params = keep(params, state["params"])
      opt_state = keep(opt_state, state["opt_state"])
    first = jnp.where((state["first_nonfinite"] < 0) & ~finite, state["step"],
                      state["first_nonfinite"])
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1,
                     first_nonfinite=first.astype(jnp.int32),
                     nonfinite_steps=state["nonfinite_steps"] + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()},
               "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
               "skipped": (~finite).astype(jnp.int32), "saturated": saturated,
               "nonfinite_steps_total": new_state["nonfinite_steps"]}
    for i, (_, schedule) in enumerate(schedules):
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
    f.write(f"{n_params} parameters ({n_params / 1e6:.2f}M)\n"
            f"{sharding.describe(state['params'])}\n")


def _metric_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
  """`step 96/480 (epoch 2.0): loss 9.12 (negnce 8.7, tpm 0.42), grad_norm 3.1, 210 clips/s`."""
  parts = [f"{k.split('/', 1)[1]} {v:.4g}" for k, v in sorted(metrics.items())
           if k.startswith("loss/") and k.count("/") == 1]
  return (f"step {step}/{total} (epoch {metrics['epoch']:.1f}): loss {metrics['loss']:.4g} "
          f"({', '.join(parts)}), grad_norm {metrics['grad_norm']:.3g}, "
          f"{metrics['clips_per_s']:.1f} clips/s")


# ==================================================================================================
# Resume rules: what a checkpoint records, and which changes a resume may make.
# ==================================================================================================
# Config keys that say how a run executes, logs, evaluates, or where it finds its files: free to
# change when resuming. EVERY OTHER key defines the objective (model.*, optimizer.*, batch_size,
# seed, dataset / split / caption mode, max_words / num_frames / image_size, num_epochs /
# num_train_steps, accum_steps, ...): it is recorded in each checkpoint's meta, and a resume that
# changes it is refused unless `config.resume_allow_changes` names it. A new key is an objective
# key until it is added here.
RESUME_FREE_KEYS = frozenset({
    "mode", "eval_checkpoint", "resume_allow_changes",
    "data_dir", "build_if_missing", "num_workers", "cache_frames",
    "eval_split", "eval_caption_mode", "eval_every", "eval_batch_size", "eval_max_examples",
    "score_budget_mb", "dsl", "eval_length_buckets", "eval_lower_median",
    "init_from", "clip_preset",   # the CLIP sizes they imply are recorded as clip.*
    "dtype", "remat", "attention_impl",   # how to compute, not what (build_lib.COMPUTE_FIELDS)
    "sharding_rules", "min_fsdp_size", "nan_policy",
    "log_every", "progress_bar", "checkpoint_every", "keep_checkpoints", "best_metric",
    "async_checkpoints", "saturation_policy", "saturation_window", "eval_save_scores",
})
RESUME_FREE_PREFIXES = ("mesh.",)

_RESUME_HINT = ("resume with the saved values, use a fresh --workdir, or accept the change(s) with "
                "--config.resume_allow_changes={keys} (see docs/training.md, 'Integrity and "
                "resume rules')")


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"optimizer.b2": 0.98, ...}: every leaf key of the config, values as JSON sees them."""
  out: dict[str, Any] = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = json.loads(json.dumps(v))
  walk(config.to_dict(), "")
  return out


def checkpoint_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What each checkpoint records: the model meta plus every objective-defining config key.

  Flat and JSON-able (`{"model.tau": 0.6, "optimizer.b2": 0.98, "clip.vision_width": 64, ...}`);
  known before any model is built, so a mismatching checkpoint is refused before anything is
  written.
  """
  meta = build_lib.model_meta(config)
  for key, value in _flat_config(config).items():
    if key not in RESUME_FREE_KEYS and not key.startswith(RESUME_FREE_PREFIXES):
      meta.setdefault(key, value)
  return meta


def resume_checks(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict[str, Any],
                                                                list[str]]:
  """(meta to save, the part of it a checkpoint must match in this mode, allowed changes).

  Training compares everything recorded; evaluation only what changes the similarities
  (model meta without the loss-only fields). Raises ConfigError for a
  `resume_allow_changes` entry that is not a recorded key.
  """
  meta = checkpoint_meta(config)
  if config.mode == "eval":
    compared = {k: meta[k] for k in build_lib.eval_meta_keys(build_lib.model_meta(config))}
  else:
    compared = meta
  allowed = [k.strip() for k in str(config.resume_allow_changes).split(",") if k.strip()]
  unknown = [k for k in allowed if k not in meta]
  if unknown:
    raise ConfigError(
        f"config.resume_allow_changes names {unknown}, which checkpoints do not record (keys "
        f"free to change need no allowing: {sorted(RESUME_FREE_KEYS)}, mesh.*); recorded keys "
        f"are e.g. {sorted(meta)[:8]}")
  return meta, compared, allowed


def _checkpoint_location(config, workdir: str) -> tuple[str, int | None]:
  """(checkpoint directory, the step mode=eval was told to use or None)."""
  if config.mode == "eval" and config.eval_checkpoint:
    ckpt_dir, name = os.path.split(os.path.normpath(os.path.abspath(config.eval_checkpoint)))
    if not name.isdigit() or not os.path.isdir(config.eval_checkpoint):
      raise FileNotFoundError(f"config.eval_checkpoint={config.eval_checkpoint!r} is not a "
                              "checkpoint step directory (expected WORKDIR/checkpoints/<step>)")
    return ckpt_dir, int(name)
  return os.path.join(workdir, "checkpoints"), None


def _check_checkpoint_settings(reader: checkpointing.TrainCheckpointManager, step: int | None,
                               compared: Mapping[str, Any], allowed: list[str]) -> None:
  """Refuses (CheckpointMismatchError) a checkpoint of other settings; reads only.

  Checks `step`, or the newest step whose meta is readable (damaged ones are dealt with when
  restoring). Warns about settings the checkpoint does not record (an older version wrote it).
  """
  for s in ([step] if step is not None else reversed(reader.all_steps())):
    try:
      saved = reader.read_meta(s)
    except checkpointing.CheckpointDamagedError:
      if step is not None:
        raise
      continue
    reader.check_meta(s, compared, allow_changes=allowed, hint=_RESUME_HINT)
    unrecorded = checkpointing.unrecorded_keys(saved, compared)
    if unrecorded:
      logging.warning("checkpoint %s does not record %d of this run's settings (%s%s): they are "
                      "not checked (written by an older version)", reader.step_dir(s),
                      len(unrecorded), ", ".join(unrecorded[:6]),
                      ", ..." if len(unrecorded) > 6 else "")
    return


# ==================================================================================================
# train_and_evaluate.
# ==================================================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or, with config.mode='eval', only evaluates); returns the last evaluation's metrics."""
  # ---- checks: nothing touches devices or the workdir before the config and inputs are valid ----
  validate_config(config)
  workdir = os.path.abspath(workdir)
  datasets.check_inputs(config)
  run_meta, compared_meta, allowed_changes = resume_checks(config)

  # ---- mesh ------------------------------------------------------------------------------------
  # One mesh for the whole run; the batch is split over ('data', 'fsdp'), parameters over 'fsdp'.
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_batch_size(config.batch_size, mesh)

  # ---- checkpoint, first look (read-only) --------------------------------------------------------
  # A checkpoint written with other settings (objective, model switches) is refused here, before
  # the run writes anything into the workdir. Its integrity is checked when it is restored.
  ckpt_dir, eval_step = _checkpoint_location(config, workdir)
  reader = None
  if os.path.isdir(ckpt_dir):
    reader = checkpointing.TrainCheckpointManager(ckpt_dir, best_metric=config.best_metric,
                                                  read_only=True)
    try:
      _check_checkpoint_settings(reader, eval_step, compared_meta, allowed_changes)
    except BaseException:
      reader.close()
      raise

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

  # ---- checkpoint: resume from the newest intact step -----------------------------------------
  # Every restored leaf is checked against the checksums recorded at save time. A damaged step is
  # skipped with a warning (naming it and why) for the next older one; a training run then sets it
  # aside as `<step>.damaged` so that it can save that step again. Evaluation only reads.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = None
  if reader is not None:
    try:
      if eval_step is not None:   # the step the user named: no fallback
        restored_state, data_state, saved_meta = reader.restore(
            eval_step, abstract, compared_meta, allow_changes=allowed_changes, hint=_RESUME_HINT)
        restored = checkpointing.Restored(eval_step, restored_state, data_state, saved_meta, [], [])
      else:
        restored = reader.restore_latest(abstract, compared_meta, allow_changes=allowed_changes,
                                         hint=_RESUME_HINT)
    finally:
      reader.close()
  if restored is not None:
    for key, saved, now in checkpointing.meta_differences(restored.meta, compared_meta):
      logging.warning("resuming with a changed setting (config.resume_allow_changes): %s: %r -> %r",
                      key, saved, now)
    skipped = ""
    if restored.skipped and config.mode == "train":
      aside = [checkpointing.set_aside_damaged(os.path.join(ckpt_dir, str(s)), why)
               for s, why in restored.skipped]
      skipped = f" (damaged newer step(s) set aside: {', '.join(aside)})"
    elif restored.skipped:
      skipped = (" (damaged newer step(s) skipped: "
                 f"{', '.join(str(s) for s, _ in restored.skipped)})")
    verb = "resuming from" if config.mode == "train" else "evaluating"
    reporting.say(f"{verb} checkpoint {os.path.join(ckpt_dir, str(restored.step))}{skipped}")
    state = restored.state
    if train_data is not None and restored.data_state is not None:
      train_data.set_state(restored.data_state)
  ckpt = None
  if config.mode == "train":
    ckpt = checkpointing.TrainCheckpointManager(
        ckpt_dir, keep=config.keep_checkpoints, best_metric=config.best_metric,
        async_save=config.async_checkpoints)
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
  train_step = train_step_for(config, setup, mesh)

  # ---- loop --------------------------------------------------------------------------------------
  step = int(jax.device_get(state["step"]))
  last_metrics: dict[str, float] = {}
  progress = None
  if config.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
  t_log, step_log = time.perf_counter(), step
  # Console metric lines about once per epoch, on a log step (the progress bar shows loss and
  # clips/s live);
  # every `log_every` steps go to the log file and TensorBoard.
  console_every = config.log_every * max(1, round(steps_per_epoch / config.log_every))
  guard = health.SaturationGuard(config.saturation_window, config.saturation_policy)
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
          logging.info("step %d: %s", step,
                       ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
          if progress is not None:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                 clips_s=f"{metrics['clips_per_s']:.1f}")
          if step % console_every == 0 or is_last:
            reporting.say(_metric_line(step, total_steps, metrics))
          reporting.write_scalars(writer, step, {f"train/{k}": v for k, v in metrics.items()})
          guard.check(step, metrics)   # one console line (or a stop) on a saturated window
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
                    meta=run_meta)   # refuses non-finite leaves, records checksums
        if preempted:
          reporting.say(f"stopping at step {step} after SIGTERM; resume with the same command")
          break
  finally:
    # Also on errors (NaN stop, KeyboardInterrupt): finish pending checkpoint writes, stop workers.
    if progress is not None:
      progress.close()
    try:
      ckpt.close()   # raises CheckpointWriteError if the last async save failed (full disk)
    finally:
      train_data.close()
      if writer is not None:
        writer.close()
  return last_metrics

