"""The optax chain of docs/method.md §6: lr groups, decoupled decay, warmup + cosine, clipping.

    clip_by_global_norm(1.0)
      → per group g (regex on the parameter path, first match wins):
          Adam(β=(0.9, 0.98), ε=1e-6)
          + weight_decay · θ   (decoupled, AdamW style;
                                masked off biases, norms, embeddings, logit scale)
          × −lr_g · schedule(step)      (10% linear warmup from 0, then cosine to 0)

Groups (config `optimizer.groups`) are `(regex, peak_lr)` pairs; the release uses 1e-7 for CLIP
parameters and 1e-4 for new modules. A peak lr of 0 freezes the group (its updates are zero and
its Adam moments are not even allocated). Parameters the model does not train by design (`frozen`
patterns, from `RetrievalModel.untrained_params()`) are handled the same way whatever their group:
no update and no weight decay, so they stay bit-identical. Decay is decoupled in the AdamW sense:
the update adds `wd · θ` after Adam's normalisation and the sum is scaled by the learning rate, as
torch.optim.AdamW and CLIP4Clip's BertAdam do.

Parameter paths are '/'-joined keys of the pure parameter tree, e.g. `clip/visual/conv1/kernel`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tvr_jax import sharding

# Leaves that never get weight decay (docs/method.md §6): biases, norms, embeddings, logit scale.
DEFAULT_NO_DECAY = (
    r"(^|/)bias$",
    r"(^|/)(ln_[^/]*|[^/]*norm[^/]*)/",        # every leaf of a LayerNorm module (scale and bias)
    r"(^|/)scale$",
    r"embedding",                                # token/positional/class/frame position embeddings
    r"logit_scale",
)

LOGIT_SCALE_PATTERN = r"(^|/)logit_scale$"


def warmup_cosine(peak_lr: float, total_steps: int, warmup_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr` over `warmup_fraction` of the steps, then cosine to 0."""
  total_steps = max(int(total_steps), 1)
  warmup = int(round(warmup_fraction * total_steps))
  if warmup == 0:
    return optax.cosine_decay_schedule(peak_lr, total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, total_steps, end_value=0.0)


FROZEN_LABEL = "frozen"


def group_labels(params: Any, groups: Sequence[tuple[str, float]],
                 frozen: Sequence[str] = ()) -> Any:
  """Tree of group names ('g0', 'g1', ...) for `params` by the first matching regex.

  Paths matching a `frozen` regex get FROZEN_LABEL instead, before any group is tried.
  Raises ValueError naming the parameter when no group matches (end the list with '.*').
  """
  def label(path, _):
    p = sharding.path_str(path)
    if any(re.search(f, p) for f in frozen):
      return FROZEN_LABEL
    for i, (pattern, _) in enumerate(groups):
      if re.search(pattern, p):
        return f"g{i}"
    raise ValueError(f"parameter {p!r} matches no entry of config.optimizer.groups "
                     f"{[g[0] for g in groups]}; end the list with ('.*', lr)")
  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any, no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> Any:
  """Tree of bools: True where weight decay applies (no pattern of `no_decay` matches the path)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(re.search(p, sharding.path_str(path)) for p in no_decay), params)


def build(config: Mapping[str, Any], total_steps: int, params: Any, frozen: Sequence[str] = ()
          ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """The full optimizer for the parameter tree `params` (arrays or ShapeDtypeStructs).

  Args:
    config: `config.optimizer` with keys `groups` [(regex, peak_lr)], `b1`, `b2`, `eps`,
      `weight_decay`, `warmup_fraction`, `grad_clip_norm` (0 or None: no clipping), optional
      `no_decay` [regex].
    total_steps: number of optimizer steps of the run (the schedule's length).
    params: the pure parameter tree the optimizer will update.
    frozen: regexes of parameter paths that get no gradient by design (e.g. the release's
      untrained sentence-to-video predictor): zero updates, no decay, no Adam moments. Without
      this, decoupled weight decay would still shrink them every step.

  Returns:
    `(tx, schedules)`; `schedules` maps each group's regex to its lr schedule (for logging).
  """
  groups = [(str(p), float(lr)) for p, lr in config["groups"]]
  frozen = tuple(frozen)
  labels = group_labels(params, groups, frozen)
  no_decay = tuple(config.get("no_decay", None) or DEFAULT_NO_DECAY)
  mask = decay_mask(params, no_decay)
  transforms, schedules = {}, {}
  if frozen:
    transforms[FROZEN_LABEL] = optax.set_to_zero()
  for i, (pattern, lr) in enumerate(groups):
    if lr == 0.0:
      transforms[f"g{i}"] = optax.set_to_zero()
      schedules[pattern] = optax.constant_schedule(0.0)
      continue
    schedule = warmup_cosine(lr, total_steps, float(config["warmup_fraction"]))
    schedules[pattern] = schedule
    transforms[f"g{i}"] = optax.chain(
        optax.scale_by_adam(b1=float(config["b1"]), b2=float(config["b2"]),
                            eps=float(config["eps"])),
        optax.add_decayed_weights(float(config["weight_decay"]), mask=mask),
        optax.scale_by_learning_rate(schedule),
    )
  chain = []
  clip = config.get("grad_clip_norm", None)
  if clip:
    chain.append(optax.clip_by_global_norm(float(clip)))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), schedules


def clamp_logit_scale(params: Any, max_value: float = math.log(100.0)) -> Any:
  """Clamps every `logit_scale` leaf to [0, ln 100], as CLIP's training does after each step.

  A no-op tree map when the model has no trainable logit scale (or it is frozen).
  """
  def clamp(path, x):
    if re.search(LOGIT_SCALE_PATTERN, sharding.path_str(path)):
      return jnp.clip(x, 0.0, max_value)
    return x
  return jax.tree_util.tree_map_with_path(clamp, params)
