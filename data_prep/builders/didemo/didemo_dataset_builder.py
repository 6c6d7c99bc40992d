"""DiDeMo: paragraph-to-video retrieval; every description of a video with its time window.

Raw layout (CLIP4Clip's `didemo_data/` + videos; LisaAnne/LocalizingMoments annotations):

    train_data.json, val_data.json, test_data.json
        [{"video": "<file name>", "description": "...", "times": [[s, e], ...], ...}, ...]
        `times` are 5-second segment indices, one pair per annotator.
    {train,val,test}_list.txt   optional (CLIP4Clip): restrict a split to these video names
    **/<video>                  the video file named exactly as the `video` field (CLIP4Clip);
                                a transcoded `<video>.mp4` or `<video stem>.<ext>` is found too

Each video gives one example: its descriptions in time order, each with the window CLIP4Clip
computes (start = mean(s) * 5, end = (mean(e) + 1) * 5 seconds); frames are sampled in 0-31 s, as
CLIP4Clip does (annotations cover the first 30 s).
"""

from __future__ import annotations

import numbers

import tensorflow_datasets as tfds

from data_prep import raw_files
from data_prep import base
from data_prep.video_index import VideoIndex

SEGMENT_SECONDS = 5.0
FRAME_WINDOW = (0.0, 31.0)


def _segment_window(times) -> tuple[float, float] | None:
  """(start, end) seconds of one description's annotator votes, or None if malformed."""
  if not isinstance(times, list) or not times:
    return None
  pairs = []
  for t in times:
    if (not isinstance(t, (list, tuple)) or len(t) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in t)):
      return None
    pairs.append((float(t[0]), float(t[1])))
  start = sum(p[0] for p in pairs) / len(pairs) * SEGMENT_SECONDS
  end = (sum(p[1] for p in pairs) / len(pairs) + 1) * SEGMENT_SECONDS
  return start, end


class Didemo(base.VideoTextBuilder):
  """DiDeMo paragraph-to-video retrieval (train / val / test)."""

  name = "didemo"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = base.default_configs(num_frames=64)
  SPLITS = ("train", "val", "test")
  EVAL_SPLIT = "test"
  HAS_TIMESTAMPS = True
  REQUIRED_FILES = ("train_data.json", "val_data.json", "test_data.json")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the DiDeMo annotations train_data.json, val_data.json, test_data.json
  (https://github.com/LisaAnne/LocalizingMoments, data/) and the videos (same page,
  download_videos.sh, or CLIP4Clip's instructions at https://github.com/ArrowLuo/CLIP4Clip) into the
  manual directory (videos in any sub-folder, named as the `video` field of the annotations).
  """

  def _split_items(self, manual_dir):
    videos = VideoIndex(manual_dir)
    result = {}
    for split in self.SPLITS:
      json_path = manual_dir / f"{split}_data.json"
      data = raw_files.read_json(json_path)
      if not isinstance(data, list):
        raise base.RawDataError(f"{json_path}: expected a list of annotations, got "
                                f"{type(data).__name__}")
      list_path = manual_dir / f"{split}_list.txt"
      allowed = set(raw_files.read_lines(list_path)) if list_path.exists() else None
      per_video: dict[str, list[tuple[tuple[float, float], object]]] = {}
      for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
          self.skips.add("malformed_annotation", split, json_path.name, f"[{i}] = {entry!r:.80}")
          continue
        window = _segment_window(entry.get("times"))
        if window is None or "description" not in entry:
          self.skips.add("malformed_annotation", split, json_path.name,
                         f"[{i}] ({entry['video']}): bad or missing times/description")
          continue
        if allowed is not None and entry["video"] not in allowed:
          continue
        per_video.setdefault(entry["video"], []).append((window, entry["description"]))
      items = []
      for video, segments in per_video.items():
        segments.sort(key=lambda s: s[0])  # time order (stable for equal windows)
        stem = video.rsplit(".", 1)[0] if "." in video else video
        items.append(base.VideoItem(
            video, videos.find(video, f"{video}.mp4", stem),
            captions=[s[1] for s in segments], timestamps=[s[0] for s in segments],
            window=FRAME_WINDOW, where=f"{json_path.name}:{video}"))
      result[split] = items
    return result
