"""Grain input pipeline over the TFDS array_record datasets that `data_prep` builds.

- `VideoSplit.open(data_dir, split)`: one split, its video ids and captions (`source.py`).
- `FrameCache.fill(split)`: decoded uint8 frames in a RAM-backed memory map (`cache.py`).
- `TrainIterator(split, ...)`: shuffled, repeated global training batches with `get_state` /
  `set_state` (`training.py`).
- `EvalData(split, ...)`: `video_batches()` and `caption_batches()` covering each once, padded,
  with `valid` and index arrays (`evaluation.py`).

Batch layout: docs/ARCHITECTURE.md "Batches"; usage and figures: docs/input_pipeline.md.
"""

from tvr_jax.data.cache import FrameCache, default_cache_root
from tvr_jax.data.evaluation import EvalData
from tvr_jax.data.source import CAPTION_MODES, VideoSplit
from tvr_jax.data.training import TrainIterator

__all__ = ["CAPTION_MODES", "EvalData", "FrameCache", "TrainIterator", "VideoSplit",
           "default_cache_root"]
