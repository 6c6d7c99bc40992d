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
from tvr_jax import optimizer as optimizer_lib
from tvr_jax import sharding

PyTree = Any
State = dict[str, Any]


# ==================================================================================================
# Config checks: fail before any device work, with the command that fixes the problem.
# ==================================================================================================
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for unknown keys (vs configs/base.py) or unsupported values.

  Config files build on `configs.base.get_base_config()`; a key that is not declared there (a typo
  in a config file) would otherwise be silently ignored. (`--config.key=value` on the command line
  already fails for unknown keys: the config is locked.)
  """
  try:
    from configs import base  # the declared keys (configs/ beside the package, or on sys.path)
  except ImportError:
    logging.warning("configs/base.py is not importable: config keys are not checked")
  else:
    _check_keys(config, base.get_base_config(), "config")
  if config.mode not in ("train", "eval"):
    raise ValueError(f"config.mode={config.mode!r}: use 'train' or 'eval'")
  if config.nan_policy not in ("stop", "skip"):
    raise ValueError(f"config.nan_policy={config.nan_policy!r}: use 'stop' or 'skip'")
  if config.accum_steps != 1:
    raise ValueError(
        f"config.accum_steps={config.accum_steps} is not supported: accumulating gradients over "
        "micro-batches would compute NegNCE / InfoNCE / TPM-CL over each micro-batch, i.e. with "
        f"1/{config.accum_steps} of the negatives, which is a different objective from the "
        "global-batch recipe. Use more devices (the global batch is split over them and the loss "
        "still spans it) or `remat=True` / `dtype='bfloat16'` to fit the batch in memory. "
        "See docs/training.md.")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'")


def _check_keys(config: Any, reference: Any, where: str) -> None:
  if not isinstance(reference, ml_collections.ConfigDict) or reference is None:
    return
  if not isinstance(config, ml_collections.ConfigDict):
    return
  for key in config.keys():
    if key not in reference:
      raise ValueError(f"unknown config key {where}.{key}; known keys: {sorted(reference.keys())}")
    if key != "model":  # model keys belong to the model's own config, checked there
      _check_keys(config[key], reference[key], f"{where}.{key}")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Stops at once, saying what to download and run, when the CLIP or the dataset is missing.

  The synthetic set (config.build_if_missing) is built here instead.
  """
  if config.init_from and not os.path.isfile(os.path.join(config.init_from, "clip_config.json")):
    raise FileNotFoundError(
        f"config.init_from={config.init_from!r} is not a converted CLIP checkpoint. Download OpenAI's "
        "ViT-B-32.pt (or ViT-B-16.pt) and convert it once:\n"
        f"  python -m tvr_jax.convert --src ViT-B-32.pt --out {config.init_from}\n"
        "or set --config.init_from='' to train a CLIP of config.clip_preset from scratch.")
  if dataset_dir(config, must_exist=False) is not None:
    return
  if config.build_if_missing:
    build_dataset(config)
    return
  raise FileNotFoundError(
      f"dataset {config.dataset!r} with {config.num_frames} frames at {config.image_size} px is not "
      f"built under config.data_dir={config.data_dir!r}. Download the raw videos and annotations "
      "(layouts: docs/data.md) and prepare them once:\n"
      f"  python -m data_prep.build {config.dataset} --manual_dir=/path/to/{config.dataset} "
      f"--data_dir={config.data_dir} --num_frames={config.num_frames} --resolution={config.image_size}")


# ==================================================================================================
# Input: locating, building and opening the TFDS splits that data_prep writes.
# ==================================================================================================
def dataset_dir(config: ml_collections.ConfigDict, must_exist: bool = True) -> str | None:
  """The TFDS version directory of `config.dataset` with `num_frames` frames at `image_size` px.

  `data_prep.build` writes `DATA_DIR/<dataset>/f<F>_r<R>_.../<version>/`; the newest version of a
  matching config wins. `config.data_dir` may also point at a version directory directly.
  """
  root = os.path.abspath(os.path.expanduser(config.data_dir))
  if os.path.isfile(os.path.join(root, "dataset_info.json")):
    return root
  candidates = []
  base_dir = os.path.join(root, config.dataset)
  if os.path.isdir(base_dir):
    for name in sorted(os.listdir(base_dir)):
      if not name.startswith(f"f{config.num_frames}_r{config.image_size}_"):
        continue
      for version in sorted(os.listdir(os.path.join(base_dir, name))):
        path = os.path.join(base_dir, name, version)
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
          candidates.append(path)
  if candidates:
    return sorted(candidates, key=lambda p: [int(x) if x.isdigit() else x
                                             for x in os.path.basename(p).split(".")])[-1]
  if must_exist:
    check_inputs(config)  # raises with the command to run
  return None


def build_dataset(config: ml_collections.ConfigDict) -> None:
  """Builds `config.dataset` (the synthetic set) into `config.data_dir`; process 0 builds."""
  from data_prep import build as build_lib
  if jax.process_index() == 0:
    logging.info("building dataset %r into %s", config.dataset, config.data_dir)
    summary = build_lib.build(config.dataset, None, config.data_dir, num_frames=config.num_frames,
                              resolution=config.image_size, workers=os.cpu_count() or 1)
    logging.info("%s", build_lib.format_summary(summary))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("dataset built")


def open_split(config: ml_collections.ConfigDict, split: str):
  """Opens one split (`tvr_jax.data.VideoSplit`) and checks its frames fit the model."""
  from tvr_jax import data as data_lib
  opened = data_lib.VideoSplit.open(dataset_dir(config), split, progress=config.progress_bar)
  if opened.resolution != config.image_size or opened.num_frames != config.num_frames:
    raise ValueError(f"{opened.data_dir}: frames are {opened.num_frames} x {opened.resolution} px, "
                     f"the config wants num_frames={config.num_frames}, image_size={config.image_size}")
  return opened


def subset_split(split, num_videos: int):
  """The first `num_videos` videos of `split` (smoke runs evaluate on a prefix)."""
  return dataclasses.replace(split, video_ids=list(split.video_ids[:num_videos]),
                             captions=list(split.captions[:num_videos]))


def frame_cache(config: ml_collections.ConfigDict, split):
  """A filled RAM frame cache of `split` when `config.cache_frames`, else None."""
  if not config.cache_frames:
    return None
  from tvr_jax import data as data_lib
  return data_lib.FrameCache.fill(split, worker_count=config.num_workers)


def train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The endless, checkpointable iterator of global training batches."""
  from tvr_jax import data as data_lib
  split = open_split(config, config.train_split)
  return data_lib.TrainIterator(
      split, global_batch_size=config.batch_size, caption_mode=config.train_caption_mode,
      context_length=config.max_words, seed=config.seed, sharding=sharding.batch_sharding(mesh),
      worker_count=config.num_workers, cache=frame_cache(config, split))


# ==================================================================================================
# Model construction.
# ==================================================================================================
def clip_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """CLIPConfig fields the run config controls (compute dtype, remat, attention kernel)."""
  return dict(dtype=config.dtype, remat=bool(config.remat),
              attention_impl=(config.attention_impl or None))


def build_model(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> nnx.Module:
  """The retrieval model of `config`, with CLIP weights from `config.init_from` when given.

  `load_weights=False` builds the same structure with random weights (for shapes / from scratch).
  """
  from tvr_jax.models import clip as clip_lib
  from tvr_jax.models import retrieval
  if config.init_from and load_weights:
    clip = clip_lib.load_clip(config.init_from, **clip_overrides(config))
  elif config.init_from:
    with open(os.path.join(config.init_from, "clip_config.json")) as f:
      d = json.load(f)
    fields = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(clip_lib.CLIPConfig)}}
    clip = clip_lib.CLIP(clip_lib.CLIPConfig.from_dict({**fields, **clip_overrides(config)}),
                         rngs=nnx.Rngs(config.seed))
  else:
    name, overrides = config.clip_preset, dict(image_size=config.image_size)
    if name == "tiny-64":   # the synthetic config's size: tiny widths, 64 px frames, 16 px patches
      name, overrides = "tiny", dict(image_size=64, patch_size=16)
    clip = clip_lib.CLIP(clip_lib.CLIPConfig.preset(name, **overrides, **clip_overrides(config)),
                         rngs=nnx.Rngs(config.seed))
  if clip.config.image_size != config.image_size:
    raise ValueError(f"CLIP input size {clip.config.image_size} px != config.image_size="
                     f"{config.image_size}; build the dataset with --resolution={clip.config.image_size}")
  model_config = retrieval.RetrievalConfig.from_dict(
      {**config.model.to_dict(), "max_words": config.max_words, "max_frames": config.num_frames})
  return retrieval.RetrievalModel(model_config, clip, rngs=nnx.Rngs(config.seed + 1))


def model_meta(config: ml_collections.ConfigDict, model: nnx.Module) -> dict[str, Any]:
  """What a checkpoint must agree on with this run (checked on restore, beyond shapes)."""
  clip_config = getattr(getattr(model, "clip", None), "config", None)
  sizes = {}
  if clip_config is not None:
    sizes = {k: v for k, v in clip_config.to_dict().items()
             if k not in ("dtype", "remat", "attention_impl")}
  return {"clip": json.dumps(sizes, sort_keys=True), "header": str(config.model.header),
          "max_words": int(config.max_words), "num_frames": int(config.num_frames)}


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
    model_fn: `model_fn(config, load_weights=bool) -> nnx.Module`; default `build_model`.
  """
  model_fn = model_fn or build_model
  rules = [tuple(r) for r in config.sharding_rules]

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

  abstract_state = jax.eval_shape(init_from_scratch)
  shardings = sharding.tree_shardings(abstract_state, mesh, rules, config.min_fsdp_size)
  if config.init_from:
    _, params, rest = _split(model_fn(config, load_weights=True))
    params = jax.device_put(params, shardings["params"])
    rest = jax.device_put(rest, shardings["rest"]) if has_rest else rest
    state = jax.jit(assemble, out_shardings=shardings)(params, rest)
  else:
    state = jax.jit(init_from_scratch, out_shardings=shardings)()
  meta = model_meta(config, abstract_model)
  return state, TrainSetup(graphdef, tx, schedules, shardings, meta, has_rest)


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

  def step_fn(state: State, batch: dict) -> tuple[State, dict]:
    # The model is deterministic today (no dropout); a stochastic one would take
    # jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]).
    rest = state.get("rest")

    def loss_fn(params):
      model = _merge(graphdef, params, rest)
      total, terms = model.loss(batch)
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


def _summary_writer(workdir: str):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _write_scalars(writer, step: int, scalars: Mapping[str, float]) -> None:
  if writer is None:
    return
  for k, v in scalars.items():
    if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)):
      writer.add_scalar(k, float(v), step)
  writer.flush()


def num_train_steps(config, examples_per_epoch: int) -> tuple[int, int]:
  """(total optimizer steps, steps per epoch) for `config`; partial last batches are dropped."""
  steps_per_epoch = max(examples_per_epoch // config.batch_size, 1)
  if config.num_train_steps > 0:
    return int(config.num_train_steps), steps_per_epoch
  return int(config.num_epochs * steps_per_epoch), steps_per_epoch


# ==================================================================================================
# train_and_evaluate.
# ==================================================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or, with config.mode='eval', only evaluates) and returns the last evaluation's metrics."""
  from tvr_jax import evaluate as evaluate_lib

  # ---- logging ---------------------------------------------------------------------------------
  validate_config(config)
  workdir = os.path.abspath(workdir)
  logging.info("config:\n%s", config)
  check_inputs(config)

  # ---- mesh ------------------------------------------------------------------------------------
  # One mesh for the whole run; the batch is split over ('data', 'fsdp'), parameters over 'fsdp'.
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_batch_size(config.batch_size, mesh)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:   # only once every check above has passed
    with open(os.path.join(workdir, f"config_{config.mode}.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = _summary_writer(workdir)

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
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  logging.info("model: %.2fM parameters; sharding of the largest leaves:\n%s", n_params / 1e6,
               "\n".join(sharding.describe(state["params"]).splitlines()[:20]))

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
    logging.info("restoring checkpoint %s", ckpt.step_dir(restore_step))
    state, data_state, _ = ckpt.restore(restore_step, abstract, setup.meta)
    if train_data is not None and data_state is not None:
      train_data.set_state(data_state)

  # ---- evaluators --------------------------------------------------------------------------------
  evaluator = evaluate_lib.Evaluator(config, mesh, setup.graphdef, has_rest=setup.has_rest,
                                     workdir=workdir, writer=writer)
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
  logging.info("training steps %d..%d (%d per epoch, global batch %d)", step, total_steps,
               steps_per_epoch, config.batch_size)
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
          _write_scalars(writer, step, {f"train/{k}": v for k, v in metrics.items()})
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
          logging.warning("stopping at step %d after SIGTERM; resume with the same command", step)
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

