"""ActivityNet Captions: paragraph-to-video retrieval; train (10,009) and val_1 (4,917) videos.

Raw layout (CLIP4Clip's):

    train.json, val_1.json    {"v_<id>": {"duration": s, "timestamps": [[s, e], ...],
                                          "sentences": ["...", ...]}, ...}
    train_ids.json, val_ids.json   ["v_<id>", ...]  (the videos of each split)
    **/v_<id>.<ext>           the videos, any extension (CLIP4Clip matches the name stem; a file
                              named without the "v_" prefix, as CLIP4Clip's loader looks it up, is
                              found too)

Split "train" from train_ids.json + train.json; split "val" (the usual evaluation set, CLIP4Clip's
"val") from val_ids.json + val_1.json. Each video gives one example with its sentences in time order
and their (start, end) seconds; frames are sampled over the whole video (CLIP4Clip: 0 to
ceil(duration)).
"""

from __future__ import annotations

import numbers

import tensorflow_datasets as tfds

from data_prep import raw_files
from data_prep import base
from data_prep.video_index import VideoIndex

_SPLIT_FILES = {"train": ("train_ids.json", "train.json"), "val": ("val_ids.json", "val_1.json")}


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _segments(entry) -> list[tuple[tuple[float, float], object]] | None:
  """[(window, sentence)] of one annotation entry in time order, or None when malformed."""
  if not isinstance(entry, dict):
    return None
  stamps, sentences = entry.get("timestamps"), entry.get("sentences")
  if (not isinstance(stamps, list) or not isinstance(sentences, list) or not sentences
      or len(stamps) != len(sentences)):
    return None
  segments = []
  for stamp, sentence in zip(stamps, sentences):
    if not isinstance(stamp, (list, tuple)) or len(stamp) != 2 or not all(map(_is_number, stamp)):
      return None
    segments.append(((float(stamp[0]), float(stamp[1])), sentence))
  segments.sort(key=lambda s: s[0])
  return segments


class ActivityNet(base.VideoTextBuilder):
  """ActivityNet Captions paragraph-to-video retrieval (train / val = val_1)."""

  name = "activitynet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = base.default_configs(num_frames=64)
  SPLITS = ("train", "val")
  EVAL_SPLIT = "val"
  HAS_TIMESTAMPS = True
  REQUIRED_FILES = ("train_ids.json", "train.json", "val_ids.json", "val_1.json")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the ActivityNet Captions annotations (train.json, val_1.json, train_ids.json,
  val_ids.json: https://cs.stanford.edu/people/ranjaykrishna/densevid/) and the ActivityNet v1.3
  videos (http://activity-net.org/download.html; CLIP4Clip's instructions at
  https://github.com/ArrowLuo/CLIP4Clip) into the manual directory (videos in any sub-folder).
  """

  def _split_items(self, manual_dir):
    videos = VideoIndex(manual_dir)
    result = {}
    for split in self.SPLITS:
      ids_name, data_name = _SPLIT_FILES[split]
      ids = raw_files.read_json(manual_dir / ids_name)
      data = raw_files.read_json(manual_dir / data_name)
      if not isinstance(ids, list):
        raise base.RawDataError(f"{manual_dir / ids_name}: expected a list of video ids")
      if not isinstance(data, dict):
        raise base.RawDataError(f"{manual_dir / data_name}: expected an object keyed by video id")
      items = []
      for i, video_id in enumerate(ids):
        if not isinstance(video_id, str) or not video_id:
          self.skips.add("malformed_annotation", split, ids_name, f"[{i}] = {video_id!r:.80}")
          continue
        segments = _segments(data.get(video_id))
        if segments is None:
          self.skips.add("malformed_annotation", split, f"{data_name}:{video_id}",
                         f"missing entry or bad timestamps/sentences: "
                         f"{data.get(video_id)!r:.120}")
          continue
        bare = video_id[2:] if video_id.startswith("v_") else video_id
        items.append(base.VideoItem(
            video_id, videos.find(video_id, bare), captions=[s[1] for s in segments],
            timestamps=[s[0] for s in segments], where=f"{data_name}:{video_id}"))
      result[split] = items
    return result
