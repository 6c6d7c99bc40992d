"""Text-video retrieval metrics on similarity matrices (docs/method.md §7): R@1/5/10, MdR, MnR.

Conventions:
- `sim` is a numpy-compatible [N_text, N_video] matrix: rows are text queries, columns videos.
- One caption per video (MSR-VTT 1k-A, DiDeMo / ActivityNet paragraphs): `sim` is square and the
  ground truth is on the diagonal. Text→video ranks each row; video→text ranks each row of `sim.T`.
- Several captions per video (MSVD): `caption_video[N_cap]` gives each row's video. Text→video
  ranks every caption's own video. Video→text scores video v against caption group g (the captions
  of video g) as max over g's captions, giving a [N_video, N_video] matrix with the truth on the
  diagonal, and ranks the groups.
- Ranks are pessimistic: a query's 0-based rank is the number of OTHER candidates whose score is not
  strictly below the ground truth's (`not other < truth`). Ties therefore never flatter a model:
  a constant scorer gets rank N−1 for every query (R@k = 0 for k < N, below the chance level k/N;
  MdR = N). NaN never flatters either: a NaN competitor counts as scoring at least as high, and a
  NaN ground-truth score ranks last. On tie-free finite data the ranks equal CLIP4Clip's.
- Metric keys name direction and metric: `t2v/R@1`, `t2v/R@5`, `t2v/R@10`, `t2v/MdR`, `t2v/MnR`,
  `t2v/StdR` (population standard deviation of the 1-based ranks), the same for `v2t/`. R@k is in
  percent; MdR, MnR and StdR are 1-based. Dual-softmax rows carry the prefix `dsl/`.

`clip4clip_compat=True` reproduces CLIP4Clip's published protocol where it differs
(docs/method.md §7, §A.7): its multi-caption text→video MdR is `torch.median`'s LOWER middle value
for an even count, and its multi-caption text→video R@k are rounded to float32. Everything else
(including the tie and NaN rule, which CLIP4Clip leaves to argsort order) is the same in both modes.

Memory: ranking works on row blocks and builds one boolean block at a time, so the 27,700 × 670
MSVD matrix never needs more than one extra copy of itself.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "caption_group_similarity", "dsl_retrieval_metrics", "dual_softmax", "format_table",
    "rank_metrics", "retrieval_metrics", "retrieval_ranks",
]

TOP_K = (1, 5, 10)
TABLE_COLUMNS = ("R@1", "R@5", "R@10", "MdR", "MnR")
_log = logging.getLogger(__name__)


def _as_matrix(sim, name: str = "sim") -> np.ndarray:
  """Checks that `sim` is a 2-D real matrix with at least one row and column."""
  sim = np.asarray(sim)
  if sim.ndim != 2 or 0 in sim.shape:
    raise ValueError(f"{name} must be a non-empty 2-D [queries, candidates] matrix, got shape "
                     f"{sim.shape}")
  if not (np.issubdtype(sim.dtype, np.floating) or np.issubdtype(sim.dtype, np.integer)):
    raise TypeError(f"{name} must hold real numbers, got dtype {sim.dtype}")
  return sim


def retrieval_ranks(sim, targets=None, *, block_rows: int = 4096) -> np.ndarray:
  """0-based pessimistic rank of each query's ground truth.

  Args:
    sim: [N_query, N_candidate] scores, higher = better.
    targets: [N_query] int, the ground-truth column of each row; None means the diagonal (needs a
      square `sim`).
    block_rows: rows compared at once (bounds the temporary boolean block).

  Returns:
    int64 [N_query]: for row i, the number of columns j != targets[i] with NOT
    `sim[i, j] < sim[i, targets[i]]` (ties and NaN competitors count; a NaN truth ranks last).
  """
  sim = _as_matrix(sim)
  n_query, n_cand = sim.shape
  if targets is None:
    if n_query != n_cand:
      raise ValueError(f"sim is {sim.shape}: a diagonal ground truth needs a square matrix "
                       "(pass targets / caption_video for several captions per video)")
    targets = np.arange(n_query)
  targets = np.asarray(targets)
  if targets.shape != (n_query,) or not np.issubdtype(targets.dtype, np.integer):
    raise ValueError(f"targets must be an int array of shape ({n_query},), got "
                     f"{targets.dtype} {targets.shape}")
  if n_query and (targets.min() < 0 or targets.max() >= n_cand):
    bad = np.flatnonzero((targets < 0) | (targets >= n_cand))
    raise ValueError(f"targets out of range [0, {n_cand}) at rows {bad[:5].tolist()} "
                     f"(values {targets[bad[:5]].tolist()})")
  n_nan = 0
  ranks = np.empty(n_query, dtype=np.int64)
  for start in range(0, n_query, block_rows):
    block = sim[start:start + block_rows]
    rows = np.arange(block.shape[0])
    truth = block[rows, targets[start:start + block_rows]]
    # `not (x < truth)` counts ties, NaN competitors and, for a NaN truth, every column; minus one
    # for the truth itself (always counted, NaN included).
    ranks[start:start + block.shape[0]] = (~(block < truth[:, None])).sum(axis=1) - 1
    if np.issubdtype(block.dtype, np.floating):
      n_nan += int(np.isnan(block).sum())
  if n_nan:
    _log.warning("retrieval_ranks: %d NaN scores in a %s matrix, ranked pessimistically "
                 "(NaN competitor counts as higher, NaN ground truth ranks last)", n_nan, sim.shape)
  return ranks


def rank_metrics(ranks, *, lower_median: bool = False,
                 float32_recall: bool = False) -> dict[str, float]:
  """R@1/5/10 (percent), MdR, MnR, StdR (1-based) from 0-based ranks.

  Args:
    ranks: [N] 0-based ranks (e.g. from `retrieval_ranks`).
    lower_median: MdR = lower middle value for an even count (torch.median, CLIP4Clip's
      multi-caption t2v) instead of the mean of the two middle values (np.median).
    float32_recall: round R@k to float32 as CLIP4Clip's multi-caption t2v does
      (`count * 100 / n` under torch's float32 default dtype).

  Returns:
    {"R@1", "R@5", "R@10", "MdR", "MnR", "StdR"} as Python floats.
  """
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
  n = ranks.size
  out = {}
  for k in TOP_K:
    hits = int(np.count_nonzero(ranks < k))
    if float32_recall:
      out[f"R@{k}"] = float(np.float32(hits * 100) / np.float32(n))
    else:
      out[f"R@{k}"] = hits * 100.0 / n
  one_based = ranks.astype(np.float64) + 1.0
  if lower_median:
    out["MdR"] = float(np.sort(one_based)[(n - 1) // 2])
  else:
    out["MdR"] = float(np.median(one_based))
  out["MnR"] = float(np.mean(one_based))
  out["StdR"] = float(np.std(one_based))
  return out


def _check_caption_video(caption_video, n_cap: int, n_video: int) -> np.ndarray:
  """Validates the caption → video map against a [n_cap, n_video] matrix."""
  caption_video = np.asarray(caption_video)
  if caption_video.shape != (n_cap,) or not np.issubdtype(caption_video.dtype, np.integer):
    raise ValueError(f"caption_video must be an int array of shape ({n_cap},) (one video per "
                     f"sim row), got {caption_video.dtype} {caption_video.shape}")
  bad = np.flatnonzero((caption_video < 0) | (caption_video >= n_video))
  if bad.size:
    raise ValueError(f"caption_video out of range [0, {n_video}) at captions "
                     f"{bad[:5].tolist()} (values {caption_video[bad[:5]].tolist()})")
  counts = np.bincount(caption_video, minlength=n_video)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise ValueError(f"{empty.size} videos have no caption (video→text has no ground truth), "
                     f"first {empty[:5].tolist()}")
  return caption_video


def caption_group_similarity(sim, caption_video) -> np.ndarray:
  """Video→caption-group scores: out[v, g] = max over captions c of video g of sim[c, v].

  This is CLIP4Clip's `tensor_video_to_text_sim` on our caption-major layout. A NaN among a
  group's scores makes the group's score NaN (ranked pessimistically later).

  Args:
    sim: [N_cap, N_video] caption × video scores.
    caption_video: [N_cap] int, each caption's video; every video needs at least one caption.

  Returns:
    [N_video, N_video] (rows = videos as queries, columns = caption groups), truth on the diagonal.
  """
  sim = _as_matrix(sim)
  caption_video = _check_caption_video(caption_video, *sim.shape)
  if np.any(caption_video[1:] < caption_video[:-1]):
    order = np.argsort(caption_video, kind="stable")
    sim, caption_video = sim[order], caption_video[order]
  starts = np.flatnonzero(np.r_[True, caption_video[1:] != caption_video[:-1]])
  group_max = np.maximum.reduceat(sim, starts, axis=0)  # [N_group, N_video]; NaN propagates
  return group_max.T


def retrieval_metrics(sim, caption_video=None, *, clip4clip_compat: bool = False,
                      prefix: str = "") -> dict[str, float]:
  """Text→video and video→text metrics of a similarity matrix.

  Args:
    sim: [N_text, N_video] scores (rows = text queries). Square with the truth on the diagonal
      when `caption_video` is None.
    caption_video: [N_text] int video of each caption (several captions per video), or None.
    clip4clip_compat: reproduce CLIP4Clip's multi-caption t2v quirks (lower median, float32 R@k).
    prefix: prepended to every key (e.g. "dsl/").

  Returns:
    {f"{prefix}t2v/R@1", ..., f"{prefix}t2v/StdR", f"{prefix}v2t/R@1", ...} as floats.
  """
  sim = _as_matrix(sim)
  if caption_video is None:
    t2v = rank_metrics(retrieval_ranks(sim))
    v2t = rank_metrics(retrieval_ranks(sim.T))
  else:
    caption_video = _check_caption_video(caption_video, *sim.shape)
    t2v = rank_metrics(retrieval_ranks(sim, caption_video), lower_median=clip4clip_compat,
                       float32_recall=clip4clip_compat)
    v2t = rank_metrics(retrieval_ranks(caption_group_similarity(sim, caption_video)))
  out = {f"{prefix}t2v/{k}": v for k, v in t2v.items()}
  out.update({f"{prefix}v2t/{k}": v for k, v in v2t.items()})
  return out


def dual_softmax(sim, temperature: float = 0.01, axis: int = 0) -> np.ndarray:
  """Dual-softmax (DSL) re-scoring: sim * softmax(sim / temperature, axis).

  For retrieval along rows, the softmax runs over the OTHER queries (axis 0): a candidate that
  scores high for many queries is down-weighted. It reads the whole query set, so its results are
  reported in separate `dsl/` rows (docs/method.md §7). temperature 0.01 equals CLIP's logit
  scale of 100 on cosine similarities.

  Args:
    sim: [N_query, N_candidate] scores.
    temperature: softmax temperature (> 0).
    axis: the axis the prior is normalised over (0 = over queries).

  Returns:
    float array of `sim`'s shape (float64 for integer input). A NaN poisons its whole softmax
    slice, which is then ranked pessimistically.
  """
  sim = _as_matrix(sim)
  if not temperature > 0:
    raise ValueError(f"dual_softmax temperature must be > 0, got {temperature}")
  if not np.issubdtype(sim.dtype, np.floating):
    sim = sim.astype(np.float64)
  logits = sim / np.asarray(temperature, sim.dtype)
  logits -= logits.max(axis=axis, keepdims=True)
  prior = np.exp(logits, out=logits)
  prior /= prior.sum(axis=axis, keepdims=True)
  prior *= sim  # in place: one array of sim's size in all
  return prior


def dsl_retrieval_metrics(sim, caption_video=None, *, temperature: float = 0.01,
                          clip4clip_compat: bool = False) -> dict[str, float]:
  """Metrics after dual-softmax re-scoring, keys prefixed `dsl/` (a separate, labelled row).

  t2v ranks rows of `dual_softmax(sim)` (prior over texts for each video). v2t ranks rows of
  `dual_softmax(V)`, V = `sim.T` (one caption per video) or `caption_group_similarity` (several),
  i.e. the prior runs over videos for each caption (group).

  Args: as `retrieval_metrics`, plus the DSL `temperature`.

  Returns:
    {"dsl/t2v/R@1", ..., "dsl/v2t/StdR"}.
  """
  sim = _as_matrix(sim)
  t2v_sim = dual_softmax(sim, temperature, axis=0)
  if caption_video is None:
    t2v = rank_metrics(retrieval_ranks(t2v_sim))
    v2t = rank_metrics(retrieval_ranks(dual_softmax(sim.T, temperature, axis=0)))
  else:
    caption_video = _check_caption_video(caption_video, *sim.shape)
    t2v = rank_metrics(retrieval_ranks(t2v_sim, caption_video), lower_median=clip4clip_compat,
                       float32_recall=clip4clip_compat)
    v2t_sim = dual_softmax(caption_group_similarity(sim, caption_video), temperature, axis=0)
    v2t = rank_metrics(retrieval_ranks(v2t_sim))
  out = {f"dsl/t2v/{k}": v for k, v in t2v.items()}
  out.update({f"dsl/v2t/{k}": v for k, v in v2t.items()})
  return out


def format_table(results: Mapping[str, float],
                 columns: Sequence[str] = TABLE_COLUMNS) -> str:
  """A fixed-width console table: one row per key prefix (t2v, v2t, dsl/t2v, ...).

  Keys are `<row>/<metric>`; metrics not in `columns` (e.g. StdR) are left out, missing cells
  show "-". Rows keep the order in which they first appear in `results`.
  """
  rows: dict[str, dict[str, float]] = {}
  for key, value in results.items():
    row, sep, metric = key.rpartition("/")
    if sep and metric in columns:
      rows.setdefault(row, {})[metric] = value
  if not rows:
    raise ValueError(f"format_table: no '<row>/<metric>' keys with metrics {list(columns)} in "
                     f"{list(results)[:8]}")
  name_width = max(len("dir"), *(len(r) for r in rows))
  header = f"{'dir':<{name_width}} " + " ".join(f"{c:>7}" for c in columns)
  lines = [header, "-" * len(header)]
  for row, cells in rows.items():
    vals = " ".join(f"{cells[c]:7.1f}" if c in cells else f"{'-':>7}" for c in columns)
    lines.append(f"{row:<{name_width}} {vals}")
  return "\n".join(lines)
