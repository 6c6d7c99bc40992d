"""Memory-bounded DMAE scoring of a whole test set from cached encoded features.

The DMAE similarity of Bt texts against Bv videos passes through a [Bt, Bv, L, Nv] word-frame
tensor: for MSVD's test set (about 27.7k captions x 670 videos x 32 words x 12 frames) that is
about 28 GB in float32. `score` never forms it: it walks over blocks of (texts x videos) whose
sizes come from a memory budget in bytes, and runs one jitted block function with fixed block
shapes (the last, ragged block is padded), so it compiles exactly once. The compiled block's own
XLA memory analysis (temporaries + arguments + output) plus the host's staging copy of one text
block is checked against the budget; sizes shrink until it fits. Not counted: the [Nt, Nv] float32
result itself and the cached features the caller holds.

Features are the model's `encode_text` / `encode_video` outputs (already normalised, visual tokens
after the temporal header), kept on the host; each block is transferred as it is needed. Works on
CPU and accelerators alike.
"""

import dataclasses
import logging
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from tvr_jax.models import dmae

DEFAULT_BUDGET_BYTES = 2 << 30
# Working copies of a [Bt, Bv, L, Nv] float32 block assumed by the first size estimate (the dot
# output, its masked copy and the gathers of visual attention); the compiled size is checked.
_WORK_COPIES = 3


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """Block sizes and the compiled block's memory (bytes, from XLA's memory analysis)."""
  text_chunk: int
  video_chunk: int
  temp_bytes: int
  argument_bytes: int
  output_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.temp_bytes + self.argument_bytes + self.output_bytes


def _host_features(text_feats, video_feats, word_weights, frame_weights):
  """(sent, words, tmask, tokens, vmask) as NumPy, with their shapes and the weights checked."""
  sent, words, tmask = (np.asarray(x) for x in text_feats)
  tokens, vmask = (np.asarray(x) for x in video_feats)
  if (word_weights is None) != (frame_weights is None):
    raise ValueError("give both word_weights and frame_weights, or neither")
  if (words.shape[0] != sent.shape[0] or tmask.shape != words.shape[:2]
      or vmask.shape != tokens.shape[:2]):
    raise ValueError(f"inconsistent feature shapes: sentence {sent.shape}, words {words.shape}, "
                     f"text mask {tmask.shape}, tokens {tokens.shape}, video mask {vmask.shape}")
  return sent, words, tmask, tokens, vmask


def _block_fn(sent, words, tmask, tokens, vmask, word_w, frame_w, *, kwargs, precision):
  with dmae.head_precision_scope(precision):
    return dmae.dmae_similarity(sent, words, tmask, tokens, vmask, word_weights=word_w,
                                frame_weights=frame_w, **kwargs)


def estimate_chunks(num_texts: int, num_videos: int, num_words: int, num_tokens: int, dim: int,
                    budget_bytes: int, itemsize: int = 4) -> Tuple[int, int]:
  """First guess of (text block, video block) sizes whose working set fits `budget_bytes`.

  The video block takes every video when a single text row of the block still fits, otherwise
  the videos are split too.
  """
  pair = _WORK_COPIES * num_words * num_tokens * itemsize
  per_text = (num_words + 1) * (dim + 2) * itemsize
  per_video = num_tokens * (dim + 2) * itemsize
  cv = num_videos
  while cv > 1 and pair * cv + per_text + per_video * cv > budget_bytes:
    cv = (cv + 1) // 2
  ct = max(1, (budget_bytes - per_video * cv) // (pair * cv + per_text + cv * itemsize))
  return int(min(ct, num_texts)), int(cv)


def _host_stage_bytes(ct: int, num_words: int, dim: int, weighted: bool) -> int:
  """Bytes of the host-side padded copy of one text block (sentence, words, mask[, weights])."""
  return ct * ((num_words + 1) * dim + num_words * (2 if weighted else 1)) * 4


class ChunkedScorer:
  """Scores text features against video features block by block within a memory budget.

  Usage:
    scorer = ChunkedScorer(budget_bytes=1 << 30, textual_attention=True, visual_attention=True)
    sim = scorer(text_feats, video_feats)   # np.ndarray [Nt, Nv] float32

  `precision` is the matmul precision of the block's dots (`RetrievalConfig.head_precision`):
  "highest" (default, full float32 as in training) or "default" (the backend chooses; TF32 on
  recent NVIDIA GPUs).
  """

  def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, *, textual_attention: bool = True,
               visual_attention: bool = True, show_progress: bool = True,
               precision: str = "highest"):
    if budget_bytes <= 0:
      raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    dmae.head_precision_scope(precision)  # refuses an unknown setting here, not at first use
    self.precision = precision
    self.budget_bytes = int(budget_bytes)
    self.kwargs = dict(textual_attention=textual_attention, visual_attention=visual_attention,
                       normalize=False)
    self.show_progress = show_progress
    self._jitted = jax.jit(lambda *a: _block_fn(*a, kwargs=self.kwargs, precision=precision))
    self._compiled: Dict[Any, Any] = {}
    self.compilations = 0
    self.plan: Optional[ChunkPlan] = None

  def lower(self, ct: int, cv: int, words_shape, tokens_shape, weighted: bool = False,
            sharding: Optional[jax.sharding.Sharding] = None):
    """The block function lowered for ct texts x cv videos (`words_shape` [., L, D], `tokens_shape`
    [., T, D]); `sharding` places it on a given device (e.g. a compile-only accelerator)."""
    f32 = jnp.float32
    num_words, dim = words_shape[1:]
    num_tokens = tokens_shape[1]
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    shapes = [sds((ct, dim), f32), sds((ct, num_words, dim), f32),
              sds((ct, num_words), jnp.int32), sds((cv, num_tokens, dim), f32),
              sds((cv, num_tokens), jnp.int32)]
    shapes += ([sds((ct, num_words), f32), sds((cv, num_tokens), f32)] if weighted
               else [None, None])
    return self._jitted.lower(*shapes)

  def _compile(self, ct, cv, words_shape, tokens_shape, weighted):
    key = (ct, cv, words_shape[1:], tokens_shape[1:], weighted)
    if key not in self._compiled:
      self._compiled[key] = self.lower(ct, cv, words_shape, tokens_shape, weighted).compile()
      self.compilations += 1
    return self._compiled[key]

  def plan_for(self, num_texts: int, num_videos: int, words_shape, tokens_shape,
               weighted: bool = False) -> Tuple[ChunkPlan, Any]:
    """Chooses block sizes that fit the budget according to XLA's analysis of the compiled block."""
    num_words, dim = words_shape[1:]
    ct, cv = estimate_chunks(num_texts, num_videos, num_words, tokens_shape[1], dim,
                             self.budget_bytes)
    while True:
      compiled = self._compile(ct, cv, words_shape, tokens_shape, weighted)
      mem = compiled.memory_analysis()
      plan = ChunkPlan(ct, cv, int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes),
                       int(mem.output_size_in_bytes))
      # The host keeps one padded copy of the text block while it is transferred.
      need = plan.total_bytes + _host_stage_bytes(ct, num_words, dim, weighted)
      if need <= self.budget_bytes or (ct == 1 and cv == 1):
        break
      # Shrink in proportion to the overshoot (the block's memory is close to linear in ct).
      factor = self.budget_bytes / need
      if ct > 1:
        ct = max(1, int(ct * factor * 0.95))
      else:
        cv = max(1, int(cv * factor * 0.95))
    if plan.total_bytes > self.budget_bytes:
      logging.warning("one (1 text x 1 video) block needs %d bytes, over the budget of %d",
                      plan.total_bytes, self.budget_bytes)
    return plan, compiled

  def __call__(self, text_feats, video_feats, word_weights: Optional[np.ndarray] = None,
               frame_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Scores every text against every video.

    Args:
      text_feats: (sentence [Nt, D], words [Nt, L, D], text mask [Nt, L]), normalised.
      video_feats: (visual tokens [Nv, T, D], video mask [Nv, T]), normalised, after the header.
      word_weights, frame_weights: optional "wti" weights [Nt, L], [Nv, T] (both or neither).

    Returns:
      S as np.ndarray float32 [Nt, Nv].
    """
    sent, words, tmask, tokens, vmask = _host_features(text_feats, video_feats, word_weights,
                                                       frame_weights)
    nt, nv = sent.shape[0], tokens.shape[0]
    if nt == 0 or nv == 0:
      return np.zeros((nt, nv), np.float32)
    weighted = word_weights is not None
    plan, compiled = self.plan_for(nt, nv, words.shape, tokens.shape, weighted)
    self.plan = plan
    ct, cv = plan.text_chunk, plan.video_chunk

    def pad(x, n, dtype):
      x = np.asarray(x, dtype)
      out = np.zeros((n,) + x.shape[1:], dtype)
      out[:x.shape[0]] = x
      return out

    nv_pad = math.ceil(nv / cv) * cv
    # Video features are small next to the text side (MSVD: 16 MB); keep them on the device when
    # they fit in the budget, otherwise transfer each block as it is used.
    resident = nv_pad * tokens.shape[1] * (tokens.shape[2] + 2) * 4 <= self.budget_bytes
    put = jax.device_put if resident else (lambda x: x)
    video_blocks = []
    for j in range(0, nv_pad, cv):
      blk = [put(pad(tokens[j:j + cv], cv, np.float32)), put(pad(vmask[j:j + cv], cv, np.int32))]
      blk.append(put(pad(frame_weights[j:j + cv], cv, np.float32)) if weighted else None)
      video_blocks.append(blk)
    out = np.empty((nt, nv), np.float32)
    starts = range(0, nt, ct)
    for i in tqdm.tqdm(starts, desc="scoring", unit="block", disable=not self.show_progress):
      n = min(ct, nt - i)
      s_blk = jax.device_put(pad(sent[i:i + ct], ct, np.float32))
      w_blk = jax.device_put(pad(words[i:i + ct], ct, np.float32))
      m_blk = jax.device_put(pad(tmask[i:i + ct], ct, np.int32))
      ww_blk = jax.device_put(pad(word_weights[i:i + ct], ct, np.float32)) if weighted else None
      row = [compiled(s_blk, w_blk, m_blk, t_blk, vm_blk, ww_blk, fw_blk)
             for t_blk, vm_blk, fw_blk in video_blocks]
      row = np.concatenate([np.asarray(r) for r in row], axis=1)
      out[i:i + n] = row[:n, :nv]
    return out


def score(text_feats, video_feats, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
          textual_attention: bool = True, visual_attention: bool = True,
          word_weights: Optional[np.ndarray] = None, frame_weights: Optional[np.ndarray] = None,
          show_progress: bool = True, precision: str = "highest") -> np.ndarray:
  """One-call form of `ChunkedScorer`: S [Nt, Nv] float32 of cached features within a budget."""
  scorer = ChunkedScorer(budget_bytes, textual_attention=textual_attention,
                         visual_attention=visual_attention, show_progress=show_progress,
                         precision=precision)
  return scorer(text_feats, video_feats, word_weights, frame_weights)


def score_model(model, text_feats, video_feats, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                show_progress: bool = True, rows_per_call: int = 4096) -> np.ndarray:
  """S [Nt, Nv] with the switches of a `RetrievalModel` (incl. its learned "wti" token weights).

  Args:
    model: a `tvr_jax.models.retrieval.RetrievalModel` (its config gives the attention switches
      and the head precision;
      with `token_weights` on, the weights are computed here from the cached features, in slices of
      `rows_per_call` rows with one compiled shape).
    text_feats, video_feats: cached `encode_text` / `encode_video` outputs.
  """
  cfg = model.config
  precision = getattr(cfg, "head_precision", "highest")
  word_w = frame_w = None
  if model.token_weights is not None:
    tw = model.token_weights

    def token_weights(x, m, fc):
      with dmae.head_precision_scope(precision):
        return dmae.masked_softmax(fc(x)[..., 0], m)
    fn = jax.jit(token_weights)

    def weights(x, m, fc):
      x, m = np.asarray(x), np.asarray(m)
      out = np.zeros(m.shape, np.float32)
      for i in range(0, len(x), rows_per_call):
        xs, ms = x[i:i + rows_per_call], m[i:i + rows_per_call]
        n = len(xs)
        pad = rows_per_call - n if len(x) > rows_per_call else 0
        xs = np.concatenate([xs, np.zeros((pad,) + xs.shape[1:], xs.dtype)]) if pad else xs
        ms = np.concatenate([ms, np.zeros((pad,) + ms.shape[1:], ms.dtype)]) if pad else ms
        out[i:i + n] = np.asarray(fn(xs, ms, fc))[:n]
      return out
    word_w = weights(text_feats[1], text_feats[2], tw.text_fc)
    frame_w = weights(video_feats[0], video_feats[1], tw.video_fc)
  return score(text_feats, video_feats, budget_bytes=budget_bytes,
               textual_attention=cfg.textual_attention, visual_attention=cfg.visual_attention,
               word_weights=word_w, frame_weights=frame_w, show_progress=show_progress,
               precision=precision)


class ShardedScorer(ChunkedScorer):
  """`ChunkedScorer` over every device of a mesh and every host: N devices score N blocks at once.

  Text rows are the sharded axis. A global block of `text_chunk x devices` rows is split over a
  flat view of the mesh's devices (videos replicated); each device scores `text_chunk` rows
  against every video block, and each process reads back only its own devices' rows of S. So no
  host ever holds the full [Nt, Nv] matrix; metrics reduce per-process rows
  (`tvr_jax.evaluate.retrieval_metrics_from_rows`). Every process passes the same host features
  (evaluation gathers them to every host); only its own devices' rows are transferred.

  Usage:
    scorer = ShardedScorer(mesh, budget_bytes=1 << 30)
    rows, sim_rows = scorer.local_rows(text_feats, video_feats)  # int64 [n], float32 [n, Nv]
  """

  def __init__(self, mesh: jax.sharding.Mesh, budget_bytes: int = DEFAULT_BUDGET_BYTES, *,
               textual_attention: bool = True, visual_attention: bool = True,
               show_progress: bool = True, precision: str = "highest"):
    super().__init__(budget_bytes, textual_attention=textual_attention,
                     visual_attention=visual_attention, show_progress=show_progress,
                     precision=precision)
    self.mesh = jax.sharding.Mesh(np.asarray(mesh.devices).reshape(-1), ("rows",))
    self.num_devices = self.mesh.devices.size
    self._sharded: Dict[Any, Any] = {}

  def _sharded_fn(self, weighted: bool):
    """The block function under shard_map: text rows split over devices, videos replicated."""
    if weighted not in self._sharded:
      from jax.sharding import PartitionSpec as P
      rows, rep = P("rows"), P()
      specs = (rows, rows, rows, rep, rep) + ((rows, rep) if weighted else ())
      kwargs, precision = self.kwargs, self.precision

      def fn(*args):
        if not weighted:
          args = args + (None, None)
        return _block_fn(*args, kwargs=kwargs, precision=precision)
      self._sharded[weighted] = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=specs,
                                                      out_specs=rows))
    return self._sharded[weighted]

  def _put(self, x: np.ndarray, spec) -> jax.Array:
    """A global array from the host copy every process holds; each process fills its devices."""
    sharding = jax.sharding.NamedSharding(self.mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def local_rows(self, text_feats, video_feats, word_weights: Optional[np.ndarray] = None,
                 frame_weights: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """This process's rows of S: (global text indices int64 [n], S rows float32 [n, Nv]).

    Args: as `ChunkedScorer.__call__`. Together the processes return every row exactly once.
    """
    from jax.sharding import PartitionSpec as P
    sent, words, tmask, tokens, vmask = _host_features(text_feats, video_feats, word_weights,
                                                       frame_weights)
    nt, nv = sent.shape[0], tokens.shape[0]
    if nt == 0 or nv == 0:
      return np.zeros((0,), np.int64), np.zeros((0, nv), np.float32)
    weighted = word_weights is not None
    n_dev = self.num_devices
    # Per-device block sizes from the single-device plan; the global text block is n_dev times it.
    plan, _ = self.plan_for(-(-nt // n_dev), nv, words.shape, tokens.shape, weighted)
    self.plan = plan
    ct, cv = plan.text_chunk, plan.video_chunk
    gt = ct * n_dev
    fn = self._sharded_fn(weighted)
    rows, rep = P("rows"), P()

    def pad(x, start, n, dtype):
      x = np.asarray(x[start:start + n], dtype)
      out = np.zeros((n,) + x.shape[1:], dtype)
      out[:x.shape[0]] = x
      return out

    video_blocks = []
    for j in range(0, nv, cv):
      blk = [self._put(pad(tokens, j, cv, np.float32), rep),
             self._put(pad(vmask, j, cv, np.int32), rep)]
      if weighted:
        blk.append(self._put(pad(frame_weights, j, cv, np.float32), rep))
      video_blocks.append(blk)
    index_parts, sim_parts = [], []
    for i in tqdm.tqdm(range(0, nt, gt), desc="scoring", unit="block",
                       disable=not self.show_progress):
      t_blk = [self._put(pad(sent, i, gt, np.float32), rows),
               self._put(pad(words, i, gt, np.float32), rows),
               self._put(pad(tmask, i, gt, np.int32), rows)]
      ww_blk = [self._put(pad(word_weights, i, gt, np.float32), rows)] if weighted else []
      outs = []
      for blk in video_blocks:
        vid = blk[:2]
        args = t_blk + vid + (ww_blk + blk[2:] if weighted else [])
        outs.append(fn(*args))
      # This process's devices' rows of the global block, across all video blocks.
      by_device = [{sh.device: sh for sh in o.addressable_shards} for o in outs]
      for device in by_device[0]:
        shard_group = [shards[device] for shards in by_device]
        start = shard_group[0].index[0].start or 0
        g_rows = np.arange(i + start, i + start + ct)
        keep = g_rows < nt
        if not keep.any():
          continue
        s = np.concatenate([np.asarray(sh.data) for sh in shard_group], axis=1)[:, :nv]
        index_parts.append(g_rows[keep])
        sim_parts.append(s[keep])
    if not index_parts:
      return np.zeros((0,), np.int64), np.zeros((0, nv), np.float32)
    index = np.concatenate(index_parts).astype(np.int64)
    order = np.argsort(index, kind="stable")
    return index[order], np.concatenate(sim_parts)[order]
