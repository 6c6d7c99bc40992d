"""TFDS builder of the synthetic set: the raw tree (mp4 + annotations.json) through the real path.

    python -m data_prep.build synthetic --data_dir=OUT [--manual_dir=RAW]

Without `--manual_dir`, TFDS's default manual directory `OUT/downloads/manual/` is used. Whichever
directory it is: if it holds no `annotations.json`, the default raw tree
(`generate.SyntheticConfig()`, about 11 MB) is rendered into it and kept, so a rebuild skips the
rendering; if it holds a tree written by `python -m data_prep.synthetic --out RAW ...` (any size or
difficulty), that is built. Frames then go through `data_prep.frames` exactly as for MSR-VTT
(1 fps, uniform F, bicubic resize, centre crop, JPEG).

Splits train / val / test; every video keeps all its paraphrased captions. Default config: 8 frames
at 64 px (the clips last 8 s, so 1 fps gives 8 real frames).
"""

from __future__ import annotations

import json
import os

from etils import epath
import tensorflow_datasets as tfds

from data_prep import base
from data_prep.synthetic import generate


def read_annotations(raw_dir: str | os.PathLike) -> dict:
  """Loads and checks `raw_dir/annotations.json`; raises `base.RawDataError` naming the problem."""
  path = os.path.join(os.fspath(raw_dir), "annotations.json")
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise base.RawDataError(f"synthetic: {path} is missing; write the raw tree with "
                            "`python -m data_prep.synthetic --out DIR`") from e
  except json.JSONDecodeError as e:
    raise base.RawDataError(f"synthetic: {path} is not valid JSON: {e}") from e
  for key in ("config", "videos", "sentences"):
    if key not in data:
      raise base.RawDataError(f"synthetic: {path} has no {key!r} entry")
  return data


class Synthetic(base.VideoTextBuilder):
  """Synthetic moving shapes with attribute captions; direction is only visible across frames."""

  name = "synthetic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: torus motion, distractor pairs, 3 paraphrases."}
  BUILDER_CONFIGS = [base.make_config(num_frames=8, resolution=64)]
  SPLITS = generate.SPLITS
  HAS_TIMESTAMPS = False
  REQUIRES_MANUAL_DIR = False
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Nothing to download. Optionally render a custom raw tree first:
  `python -m data_prep.synthetic --out RAW --num_train 4096 ...` and pass `--manual_dir=RAW`.
  """

  def _raw_dir(self, manual_dir: epath.Path | None) -> str:
    """The raw tree to read, rendering the default one when there is none yet."""
    if manual_dir is None:  # TFDS normally passes its default, OUT/downloads/manual
      root = getattr(self, "_data_dir_root", None) or os.path.dirname(os.fspath(self.data_dir))
      raw_dir = os.path.join(os.fspath(root), "downloads", "manual")
    else:
      raw_dir = os.fspath(manual_dir)
    if not os.path.exists(os.path.join(raw_dir, "annotations.json")):
      generate.write_raw(generate.SyntheticConfig(), raw_dir, progress=self.progress,
                         workers=self.workers)
    return raw_dir

  def _split_items(self, manual_dir: epath.Path | None) -> dict[str, list[base.VideoItem]]:
    raw_dir = self._raw_dir(manual_dir)
    data = read_annotations(raw_dir)
    captions: dict[str, list[str]] = {}
    for i, entry in enumerate(data["sentences"]):
      if not isinstance(entry, dict) or "video_id" not in entry or "caption" not in entry:
        self.skips.add("malformed_annotation", "train", "annotations.json",
                       f"sentences[{i}] = {entry!r:.80}")
        continue
      captions.setdefault(entry["video_id"], []).append(entry["caption"])
    items: dict[str, list[base.VideoItem]] = {split: [] for split in self.SPLITS}
    for i, video in enumerate(data["videos"]):
      split = video.get("split") if isinstance(video, dict) else None
      if split not in items or "video_id" not in video:
        self.skips.add("malformed_annotation", str(split), "annotations.json",
                       f"videos[{i}] = {video!r:.80}")
        continue
      video_id = video["video_id"]
      path = os.path.join(raw_dir, "videos", f"{video_id}.mp4")
      items[split].append(base.VideoItem(
          video_id, path if os.path.exists(path) else None, captions.get(video_id, []),
          where=f"annotations.json:{video_id}"))
    return {split: v for split, v in items.items() if v}  # a 0-sized split is left out
