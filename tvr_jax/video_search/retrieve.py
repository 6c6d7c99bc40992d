"""Two-stage retrieval on a search index: exact pooled top-k, then full re-scoring of the shortlist.

Stage 1 (every indexed video): cosine of the query's pooled embedding with each video's pooled
embedding (L2-normalised masked mean of its visual tokens), exact top-K with `jax.lax.top_k` over
fixed-size chunks of the index (resident on the device, one compilation per index size).
Stage 2 (the K shortlisted videos):
- text -> video: the model's DMAE similarity (sentence + word branches, visual attention, learned
  token weights when the model has them), through `tvr_jax.scoring.ChunkedScorer`;
- video -> video: symmetric max-mean of L2-normalised frame tokens,
  `0.5 * (mean_i max_j <q_i, c_j> + mean_j max_i <q_i, c_j>)` over real frames (DMAE's token-wise
  interaction with the video in the text's place, no visual attention). A video scores 1 against
  itself, the maximum possible.

The shortlist is padded to a fixed K, so each stage compiles once per index size.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tvr_jax import scoring
from tvr_jax.models import dmae
from tvr_jax.video_search import index as index_lib

DEFAULT_SHORTLIST = 100
DEFAULT_CHUNK = 65536


@dataclasses.dataclass
class Hit:
  """One ranked result."""
  rank: int
  id: str
  path: str
  relpath: str
  score: float          # stage-2 score (the ranking)
  first_stage: float    # pooled cosine
  duration: float


@dataclasses.dataclass
class SearchResult:
  """Ranked hits plus timings in seconds (`encode`, `first_stage`, `rescore`)."""
  hits: list[Hit]
  timings: dict


@functools.partial(jax.jit, static_argnames=("k",))
def _chunked_top_k(query: jax.Array, chunks: jax.Array, bias: jax.Array, k: int):
  """Exact top-k of query [Q, D] against chunks [C, n, D] (bias [C, n]: 0 or -inf for padding).

  Each chunk keeps its own top-min(k, n) (`lax.map`, so only one [Q, n] score block is live),
  then the candidates are reduced to the global top-k (k <= number of real rows).
  Returns (scores [Q, k], flat indices [Q, k]).
  """
  n = chunks.shape[1]
  kc = min(k, n)

  def one(args):
    c, b = args
    s = query @ c.T + b[None]
    return jax.lax.top_k(s, kc)

  vals, idx = jax.lax.map(one, (chunks, bias))                     # [C, Q, k]
  offs = (jnp.arange(chunks.shape[0], dtype=jnp.int32) * n)[:, None, None]
  vals = jnp.moveaxis(vals, 0, 1).reshape(query.shape[0], -1)     # [Q, C*k]
  idx = jnp.moveaxis(idx + offs, 0, 1).reshape(query.shape[0], -1)
  best, pos = jax.lax.top_k(vals, k)
  return best, jnp.take_along_axis(idx, pos, axis=1)


class PooledIndex:
  """Pooled embeddings [N, D] resident on the device in fixed-size chunks, for exact top-k."""

  def __init__(self, pooled: np.ndarray, chunk: int = DEFAULT_CHUNK):
    pooled = np.asarray(pooled, np.float32)
    self.size, dim = pooled.shape
    chunk = max(1, min(int(chunk), self.size))
    num = -(-self.size // chunk) if self.size else 0
    padded = np.zeros((num * chunk, dim), np.float32)
    padded[:self.size] = pooled
    bias = np.full((num * chunk,), -np.inf, np.float32)
    bias[:self.size] = 0.0
    self.chunks = jax.device_put(padded.reshape(num, chunk, dim))
    self.bias = jax.device_put(bias.reshape(num, chunk))
    self.chunk = chunk

  def top_k(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """query [Q, D] (normalised) -> (scores [Q, k'], rows [Q, k']), k' = min(k, N), best first."""
    k = min(int(k), self.size)
    if k == 0:
      return np.zeros((len(query), 0), np.float32), np.zeros((len(query), 0), np.int64)
    vals, idx = _chunked_top_k(jnp.asarray(query, jnp.float32), self.chunks, self.bias, k)
    return np.asarray(vals), np.asarray(idx).astype(np.int64)


@jax.jit
def video_video_scores(query: jax.Array, query_mask: jax.Array, cands: jax.Array,
                       cand_mask: jax.Array) -> jax.Array:
  """Symmetric max-mean of normalised frame tokens: q [1, F, D], cands [K, F, D] -> [K]."""
  q = dmae.l2_normalize(query)
  c = dmae.l2_normalize(cands)
  return dmae.token_interaction(q, query_mask, c, cand_mask, visual_attention=False)[0]


class Searcher:
  """Text -> video and video -> video search over one index with one model.

  Thread-safe (a lock serialises queries: the device runs one at a time anyway). `refresh()`
  switches to a newer version of the same index directory (a rebuild) without a restart.
  """

  def __init__(self, index: index_lib.SearchIndex, model, *, shortlist: int = DEFAULT_SHORTLIST,
               chunk: int = DEFAULT_CHUNK, budget_bytes: int = 256 << 20):
    """Checks the model against the index and puts the pooled embeddings on the device.

    Raises:
      ModelMismatchError: the index was built with another model.
    """
    index.check_model(model.model_id, getattr(model, "description", ""))
    self.index = index
    self.model = model
    self.shortlist = int(shortlist)
    self.chunk = chunk
    self.pooled = PooledIndex(index.pooled, chunk)
    kw = getattr(model, "similarity_kwargs", {})
    self.scorer = scoring.ChunkedScorer(budget_bytes, show_progress=False, **kw)
    self._lock = threading.Lock()
    self._stamp = None   # version_stamp of the index directory when last checked

  def refresh(self) -> bool:
    """Loads the index directory's live version if a build committed a new one since.

    Cheap when nothing changed (one stat of `CURRENT`), so a server can call it per request.
    Returns True when it switched versions. A new version that cannot be used is not retried
    until `CURRENT` changes again; the loaded version stays in service.

    Raises:
      IndexFormatError: the new version is unreadable.
      ModelMismatchError: the new version was built with another model.
    """
    directory = self.index.directory
    stamp = index_lib.version_stamp(directory)   # taken before CURRENT is read: no missed update
    if stamp is None or stamp == self._stamp:
      return False
    with self._lock:
      if stamp == self._stamp:
        return False
      self._stamp = stamp
      if index_lib.current_version_dir(directory) == self.index.version_dir:
        return False
      index = index_lib.SearchIndex.load(directory)
      index.check_model(self.model.model_id, getattr(self.model, "description", ""))
      self.index, self.pooled = index, PooledIndex(index.pooled, self.chunk)
    return True

  def _k(self, top: int) -> int:
    return min(max(self.shortlist, int(top)), len(self.index))

  def _gather(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens / masks of the shortlisted rows, padded (mask 0) to k rows (one compiled shape)."""
    order = np.argsort(rows)   # sorted reads from the memory map
    tok = np.zeros((k,) + self.index.tokens.shape[1:], np.float32)
    msk = np.zeros((k,) + self.index.mask.shape[1:], np.int32)
    tok[order] = self.index.tokens[rows[order]]
    msk[order] = self.index.mask[rows[order]]
    return tok, msk

  def _hits(self, rows, scores, first, top) -> list[Hit]:
    order = np.argsort(-scores, kind="stable")[:top]
    hits = []
    for rank, j in enumerate(order, 1):
      v = self.index.videos[int(rows[j])]
      hits.append(Hit(rank=rank, id=v.id, path=v.path, relpath=v.relpath,
                      score=float(scores[j]), first_stage=float(first[j]), duration=v.duration))
    return hits

  def search_text(self, query: str, top: int = 10) -> SearchResult:
    """Ranks indexed videos for a text query (stage 1 pooled cosine, stage 2 DMAE)."""
    if not query or not query.strip():
      raise ValueError("empty text query")
    with self._lock:
      t0 = time.perf_counter()
      sent, words, wmask = self.model.encode_texts([query])
      t1 = time.perf_counter()
      if len(self.index) == 0:
        return SearchResult([], {"encode": t1 - t0, "first_stage": 0.0, "rescore": 0.0})
      q = np.asarray(sent, np.float32)
      q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-6)
      k = self._k(top)
      first, rows = self.pooled.top_k(q, k)
      first, rows = first[0], rows[0]
      t2 = time.perf_counter()
      tok, msk = self._gather(rows, k)
      weights = None
      tw = getattr(self.model, "token_weights", None)
      if tw is not None:
        weights = tw(words, wmask, tok, msk)
      ww, fw = weights if weights is not None else (None, None)
      scores = self.scorer((sent, words, wmask), (tok, msk), ww, fw)[0]
      t3 = time.perf_counter()
    return SearchResult(self._hits(rows, scores, first, top),
                        {"encode": t1 - t0, "first_stage": t2 - t1, "rescore": t3 - t2})

  def query_video_tokens(self, video: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(tokens [F, D], mask [F], seconds encoding) of an indexed id or a video file path."""
    if video in self.index.by_id:
      row = self.index.by_id[video]
      return np.asarray(self.index.tokens[row]), np.asarray(self.index.mask[row]), 0.0
    if not os.path.isfile(video):
      raise FileNotFoundError(f"{video!r} is neither an indexed video id nor a video file")
    from data_prep import frames as frames_lib
    t0 = time.perf_counter()
    ex = frames_lib.extract_frames(video, self.model.frame_options)   # VideoError if unreadable
    frames = index_lib.decode_frames(ex)[None]
    tokens = np.asarray(self.model.encode_videos(frames, ex.mask[None].astype(np.int32)))[0]
    return tokens, ex.mask.astype(np.int32), time.perf_counter() - t0

  def search_video(self, video: str, top: int = 10) -> SearchResult:
    """Ranks indexed videos like `video` (an indexed id or a file path): pooled, then max-mean."""
    with self._lock:
      tokens, mask, t_enc = self.query_video_tokens(video)
      if len(self.index) == 0:
        return SearchResult([], {"encode": t_enc, "first_stage": 0.0, "rescore": 0.0})
      t1 = time.perf_counter()
      q = index_lib.pool_tokens(tokens[None], mask[None])
      k = self._k(top)
      first, rows = self.pooled.top_k(q, k)
      first, rows = first[0], rows[0]
      t2 = time.perf_counter()
      tok, msk = self._gather(rows, k)
      scores = np.asarray(video_video_scores(tokens[None].astype(np.float32), mask[None], tok,
                                             msk))
      t3 = time.perf_counter()
    return SearchResult(self._hits(rows, scores, first, top),
                        {"encode": t_enc, "first_stage": t2 - t1, "rescore": t3 - t2})


def format_table(result: SearchResult) -> str:
  """Ranked table: rank, score, file, duration (as the command line prints it)."""
  if not result.hits:
    return "no results"
  width = max(len("file"), *(len(h.relpath) for h in result.hits))
  lines = [f"{'rank':>4}  {'score':>8}  {'file':<{width}}  {'duration':>8}"]
  for h in result.hits:
    lines.append(f"{h.rank:>4}  {h.score:>8.4f}  {h.relpath:<{width}}  {h.duration:>7.1f}s")
  return "\n".join(lines)


def load_searcher(index_dir: str, checkpoint: Optional[str] = None, **kwargs) -> Searcher:
  """Opens an index and the model that built it (or `checkpoint`), checking they match."""
  from tvr_jax.video_search import model as model_lib
  index = index_lib.SearchIndex.load(index_dir)
  ckpt = checkpoint or index.meta.get("checkpoint")
  if not ckpt:
    raise index_lib.IndexFormatError(f"index {index_dir} does not record its checkpoint; pass "
                                     "--checkpoint")
  model = model_lib.load_retrieval_model(ckpt)
  return Searcher(index, model, **kwargs)
