"""Training input: shuffled, endlessly repeated, fixed-shape global batches, checkpointable state.

    split = VideoSplit.open(data_dir, "train")
    it = TrainIterator(split, global_batch_size=128, caption_mode="all", context_length=32,
                       seed=0, sharding=tvr_jax.sharding.batch_sharding(mesh), worker_count=8)
    batch = next(it)   # frames uint8 [B, F, R, R, 3], frame_mask int32 [B, F],
                       # text_ids int32 [B, L], video_index int32 [B], caption_index int32 [B]
                       # (+ keyword_mask int32 [B, L] with keyword_weighting=True)
    state = it.get_state()      # JSON-ready dict: position after the last batch returned
    it.set_state(state)         # the next batch is the one that followed `state`

Order. Each process reads a disjoint block of examples (Grain `ShardOptions(process_index,
process_count, drop_remainder=True)`), shuffled with a fresh permutation each epoch; batches never
carry a remainder (they run across epoch boundaries). The batches are a function of (seed,
caption_mode, global batch, process layout, worker_count): Grain's workers each batch their own
share of the stream, so another worker_count gives another (equally valid) order, and a saved
state can only be restored with the same worker_count (Grain checks it).
"""

from __future__ import annotations

import json
from typing import Any

import grain.python as grain
import numpy as np

from tvr_jax.data import arrays
from tvr_jax.data.cache import FrameCache
from tvr_jax.data.examples import ExampleSource, MakeText, training_examples
from tvr_jax.data.source import VideoSplit

STATE_VERSION = 1


class TrainIterator:
  """Endless iterator of training batches (global `jax.Array`s; NumPy when `sharding` is None)."""

  def __init__(self, split: VideoSplit, *, global_batch_size: int, caption_mode: str,
               context_length: int, seed: int, sharding=None, worker_count: int = 0,
               worker_buffer_size: int = 2, read_threads: int = 4,
               cache: FrameCache | None = None, process_index: int | None = None,
               process_count: int | None = None, keyword_weighting: bool = False):
    """Builds the Grain loader; nothing is read until the first `next`.

    Args:
      split: the opened training split.
      global_batch_size: rows per global batch (divisible by the process count).
      caption_mode: "random", "all" or "paragraph" (see `source.CAPTION_MODES`).
      context_length: L, token columns of `text_ids`.
      seed: 32-bit seed of the shuffle and of the caption draws.
      sharding: data sharding of the mesh (leading axis over the data axes); None: NumPy out.
      worker_count: Grain worker processes that read, decode and tokenise (0: in this process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads per worker reading/decoding records (Pillow releases the GIL).
      cache: a filled `FrameCache` of this split (decoded frames in RAM), or None to decode JPEGs.
      process_index, process_count: this process's share (default: from JAX); tests simulate
        several processes by passing them.
      keyword_weighting: also give `keyword_mask` int32 [B, L] (1 on the BPE tokens of keywords,
        `tvr_jax.keywords.keyword_mask`), for a model with `keyword_weighting` on. Off: no key,
        no tagging. It does not change the order of the batches.
    """
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
      raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    p, n, local = arrays.process_layout(global_batch_size, process_index, process_count)
    video, slot = training_examples(split, caption_mode)
    per_process = video.shape[0] // n
    if per_process < local:
      raise ValueError(f"{split.name}:{split.split} has {video.shape[0]} {caption_mode!r} "
                       f"examples: {per_process} per process, fewer than one local batch of "
                       f"{local}")
    self.split = split
    self.global_batch_size = global_batch_size
    self.local_batch_size = local
    self.sharding = sharding
    self.num_examples = int(video.shape[0])
    self.steps_per_epoch = per_process // local
    self._fingerprint = {
        "dataset": f"{split.name}:{split.split}", "examples": self.num_examples,
        "caption_mode": caption_mode, "global_batch_size": global_batch_size, "seed": int(seed),
        "process_index": p, "process_count": n, "worker_count": worker_count,
        "context_length": int(context_length)}
    shard = grain.ShardOptions(shard_index=p, shard_count=n, drop_remainder=True)
    if worker_count:
      arrays.ensure_flags_parsed()
    self._loader = grain.DataLoader(
        data_source=ExampleSource(split, video, slot, cache=cache),
        sampler=grain.IndexSampler(self.num_examples, shard_options=shard, shuffle=True,
                                   num_epochs=None, seed=int(seed)),
        operations=[MakeText(split.captions, caption_mode, context_length,
                             keyword_mask=keyword_weighting),
                    grain.Batch(local, drop_remainder=True)],
        worker_count=worker_count, worker_buffer_size=worker_buffer_size, shard_options=shard,
        # Read-ahead of one local batch per worker: at 12x224^2 an example is 1.8 MB, so Grain's
        # default (500 per worker) would hold ~1 GB in every worker process.
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=local))
    self._iterator = iter(self._loader)
    self.step = 0

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict:
    """The next global batch (see the module docstring for keys, shapes and dtypes)."""
    batch = next(self._iterator)
    self.step += 1
    return arrays.to_global(batch, self.sharding, self.global_batch_size)

  def close(self) -> None:
    """Stops Grain's worker processes now (otherwise they stop when the iterator is collected)."""
    inner = getattr(self._iterator, "_iterator", None)
    if inner is not None and hasattr(inner, "close"):
      inner.close()

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def get_state(self) -> dict[str, Any]:
    """This process's position after the last batch returned, as a JSON-ready dict.

    Save it beside the model (e.g. `TrainCheckpointManager.save(..., data_state=it.get_state())`);
    every process saves its own.
    """
    return {"version": STATE_VERSION, "step": self.step, "fingerprint": dict(self._fingerprint),
            "grain": json.loads(self._iterator.get_state().decode())}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes from `get_state()`'s output: the next batch is the one that followed it.

    Raises ValueError naming the differing setting when `state` came from another pipeline
    (dataset, caption mode, batch size, seed, process layout or worker count).
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise ValueError(f"not a TrainIterator state (version {STATE_VERSION}): {str(state)[:200]}")
    saved = state["fingerprint"]
    diffs = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
    if diffs:
      raise ValueError("input state was saved by another pipeline; differing settings "
                       f"(saved, current): {diffs}")
    self._iterator.set_state(json.dumps(state["grain"]).encode())
    self.step = int(state["step"])
