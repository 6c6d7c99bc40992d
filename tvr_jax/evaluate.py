"""Evaluation: encode every video and caption once, score all pairs, report retrieval metrics.

    python -m tvr_jax.main --config=configs/msvd.py --workdir=runs/msvd --config.mode=eval
    python -m tvr_jax.main --config=configs/msvd.py --workdir=runs/zeroshot \
        --config.mode=eval --config.init_from=checkpoints/ViT-B-32        # zero-shot CLIP

Steps (also run periodically during training by `tvr_jax.train`):
1. encode: videos and captions in separate passes (each item once, global batches sharded over the
   mesh's data axes, progress bars); features are gathered to every host, in dataset order.
2. score: the DMAE similarity of every caption against every video with the chunked,
   memory-bounded scorer (`tvr_jax.scoring`); the same S as in training.
3. metrics (`tvr_jax.metrics`): R@1/5/10, MdR, MnR both directions; several captions per video
   use the multi-caption protocol (docs/method.md §7); dual-softmax (DSL) rows are separate (`dsl/...`).
4. report: a console table, `eval_step_<N>.json` in the workdir, TensorBoard scalars `eval/...`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from tvr_jax import data as data_lib
from tvr_jax import metrics as metrics_lib
from tvr_jax import reporting
from tvr_jax import scoring
from tvr_jax import sharding
from tvr_jax.data import datasets
from tvr_jax.models import build as build_lib


class Evaluator:
  """Evaluates train states of one model on `config.eval_split` (data opened once, reused)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, graphdef: Any, *,
               has_rest: bool = False, workdir: str | None = None, writer: Any = None,
               param_shardings: Any = None):
    """Prepares the encoders and the evaluation data.

    Args:
      config: the run config (`eval_split`, `eval_batch_size`, `max_words`, `dsl`, ...).
      mesh: the device mesh; batches are sharded over its data axes.
      graphdef: the model's `nnx.GraphDef` (from `train.create_train_state`).
      has_rest: whether the state has non-parameter variables (`state["rest"]`).
      workdir: where `eval_step_<N>.json` is written (None: not written).
      writer: a tensorboardX SummaryWriter (None: no TensorBoard).
      param_shardings: unused placement hint; arrays keep the shardings they arrive with.
    """
    del param_shardings
    self.config = config
    self.mesh = mesh
    self.graphdef = graphdef
    self.has_rest = has_rest
    self.workdir = workdir
    self.writer = writer
    split = datasets.open_split(config, config.eval_split)
    if config.eval_max_examples > 0 and config.eval_max_examples < split.num_videos:
      split = datasets.subset_split(split, config.eval_max_examples)
    self.split = split
    batch = config.eval_batch_size
    n_shards = sharding.data_parallel_size(mesh)
    if batch % n_shards:
      batch = -(-batch // n_shards) * n_shards   # round up: every shard gets equal rows
      logging.info("eval batch rounded up to %d (a multiple of %d data shards)", batch, n_shards)
    self.data = data_lib.EvalData(
        split, global_batch_size=batch, caption_mode=config.eval_caption_mode,
        context_length=config.max_words, sharding=sharding.batch_sharding(mesh),
        worker_count=config.num_workers, cache=datasets.frame_cache(config, split))
    self._encode_video, self._encode_text = make_encoders(graphdef, mesh)

  def encode(self, state: dict) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """All text features (sent [Nt, D], words [Nt, L, D], mask [Nt, L]) and video features
    (tokens [Nv, F, D], mask [Nv, F]) of the split, as host arrays in dataset order."""
    params, rest = state["params"], state.get("rest")
    show = self.config.progress_bar and jax.process_index() == 0
    data = self.data

    videos = [None, None]
    nv = data.num_videos
    for batch in tqdm(data.video_batches(), total=data.num_video_batches, desc="encode videos",
                      unit="batch", disable=not show, leave=False):
      tokens, vmask = self._encode_video(params, rest, batch["frames"], batch["frame_mask"])
      idx, valid = _host(batch["video_index"]), _host(batch["valid"]).astype(bool)
      tokens, vmask = np.asarray(tokens), np.asarray(vmask)
      if videos[0] is None:
        videos = [np.zeros((nv,) + tokens.shape[1:], np.float32),
                  np.zeros((nv,) + vmask.shape[1:], np.int32)]
      videos[0][idx[valid]] = tokens[valid]
      videos[1][idx[valid]] = vmask[valid]

    texts = [None, None, None]
    nt = data.num_captions
    for batch in tqdm(data.caption_batches(), total=data.num_caption_batches,
                      desc="encode captions", unit="batch", disable=not show, leave=False):
      feats = [np.asarray(x) for x in self._encode_text(params, rest, batch["text_ids"])]
      idx, valid = _host(batch["caption_index"]), _host(batch["valid"]).astype(bool)
      if texts[0] is None:
        texts = [np.zeros((nt,) + f.shape[1:], f.dtype) for f in feats]
      for out, f in zip(texts, feats):
        out[idx[valid]] = f[valid]
    return tuple(texts), tuple(videos)

  def run(self, state: dict, step: int) -> dict[str, float]:
    """Encodes, scores and reports; returns {"t2v/R@1": ..., "dsl/t2v/R@1": ..., ...}."""
    t0 = time.perf_counter()
    texts, videos = self.encode(state)
    t_encode = time.perf_counter() - t0
    switches = build_lib.retrieval_config(self.config).similarity_kwargs()
    sim = scoring.score(texts, videos, budget_bytes=int(self.config.score_budget_mb) << 20,
                        textual_attention=switches["textual_attention"],
                        visual_attention=switches["visual_attention"],
                        show_progress=self.config.progress_bar and jax.process_index() == 0)
    caption_video = self.data.caption_to_video
    single = (len(caption_video) == self.data.num_videos and
              np.array_equal(caption_video, np.arange(self.data.num_videos)))
    cv = None if single else caption_video
    results = metrics_lib.retrieval_metrics(sim, cv)
    if self.config.dsl:
      results.update(metrics_lib.dsl_retrieval_metrics(sim, cv))
    results = {k: float(v) for k, v in results.items()}
    elapsed = time.perf_counter() - t0
    protocol = "one caption per video" if single else "multi-caption"
    report = {"step": int(step), "split": f"{self.split.name}:{self.split.split}",
              "num_videos": int(self.data.num_videos), "num_captions": int(self.data.num_captions),
              "protocol": protocol, "metrics": results,
              "seconds": {"encode": round(t_encode, 2), "total": round(elapsed, 2)}}
    if jax.process_index() == 0:
      table = metrics_lib.format_table(results)
      print(f"\nevaluation at step {step} on {report['split']} ({self.data.num_videos} videos, "
            f"{self.data.num_captions} captions, {protocol}; dsl/ rows use dual softmax over the "
            f"whole query set):\n{table}\n", flush=True)
      logging.info("eval step %d (%.1fs): t2v/R@1=%.2f v2t/R@1=%.2f", step, elapsed,
                   results.get("t2v/R@1", float("nan")), results.get("v2t/R@1", float("nan")))
      if self.workdir:
        path = os.path.join(self.workdir, f"eval_step_{step}.json")
        with open(path + ".tmp", "w") as f:
          json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)
      reporting.write_scalars(self.writer, step, {f"eval/{k}": v for k, v in results.items()})
    return results


def make_encoders(graphdef: Any, mesh: jax.sharding.Mesh):
  """The jitted `(encode_video, encode_text)` of evaluation (also compiled ahead of time).

  `encode_video(params, rest, frames [B, F, R, R, 3], frame_mask [B, F])` -> (tokens [B, F, D],
  mask [B, F]); `encode_text(params, rest, text_ids [B, L])` -> (sentence [B, D], words
  [B, L, D], mask [B, L]). Outputs are replicated: every process gets all rows (features are small
  next to frames).
  """
  replicated = sharding.replicated(mesh)

  def video_fn(params, rest, frames, frame_mask):
    model = nnx.merge(graphdef, params, rest if rest is not None else {})
    return model.encode_video(frames, frame_mask)

  def text_fn(params, rest, text_ids):
    model = nnx.merge(graphdef, params, rest if rest is not None else {})
    if getattr(model, "token_weights", None) is not None:
      raise ValueError("config.model.token_weights=True ('wti') is not supported by the chunked "
                       "evaluation yet; evaluate with token_weights=False")
    return model.encode_text(text_ids)

  return (jax.jit(video_fn, out_shardings=replicated),
          jax.jit(text_fn, out_shardings=replicated))


def _host(x) -> np.ndarray:
  """A (replicated or fully addressable) array as NumPy; for sharded multi-host index arrays, all
  processes' rows are gathered."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)

