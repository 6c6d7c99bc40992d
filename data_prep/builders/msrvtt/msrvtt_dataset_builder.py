"""MSR-VTT: 9k training videos with all their captions; the 1k-A test set with one caption each.

Raw layout (CLIP4Clip's `msrvtt_data/` + videos), anywhere under the manual directory for videos:

    MSRVTT_data.json          {"videos": [...], "sentences": [{"video_id", "caption", ...}, ...]}
    MSRVTT_train.9k.csv       column `video_id` (9,000 rows)
    MSRVTT_JSFUSION_test.csv  columns `key,vid_key,video_id,sentence` (1,000 rows)
    **/videoN.mp4             (CLIP4Clip falls back to `videoN.webm`)

Split "train": one example per video of the 9k list with every caption of that video in
`MSRVTT_data.json` (docs/method.md §6: training pairs every caption with its video). Split "test":
the 1k-A videos with the JSFUSION sentence as their only caption.
"""

from __future__ import annotations

import collections

from etils import epath
import tensorflow_datasets as tfds

from data_prep import raw_files
from data_prep import base
from data_prep.video_index import VideoIndex

_DATA_JSON = "MSRVTT_data.json"
_TRAIN_CSV = "MSRVTT_train.9k.csv"
_TEST_CSV = "MSRVTT_JSFUSION_test.csv"


def _find(manual_dir: epath.Path, name: str) -> epath.Path:
  """`name` at the top of the manual dir, else in `msrvtt_data/` (CLIP4Clip's folder)."""
  for candidate in (manual_dir / name, manual_dir / "msrvtt_data" / name):
    if candidate.exists():
      return candidate
  raise base.RawDataError(f"msrvtt: expected annotation file {manual_dir / name} is missing.\n"
                          f"How to obtain it:\n{MsrVtt.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")


class MsrVtt(base.VideoTextBuilder):
  """MSR-VTT text-video retrieval (9k train / 1k-A test)."""

  name = "msrvtt"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = base.default_configs(num_frames=12)
  SPLITS = ("train", "test")
  EVAL_SPLIT = "test"
  HAS_TIMESTAMPS = False
  REQUIRED_FILES = ()  # checked in check_raw_data (they may sit in msrvtt_data/)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download CLIP4Clip's MSR-VTT package (https://github.com/ArrowLuo/CLIP4Clip, "Data Preparing":
  msrvtt_data.zip with MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv, and the
  raw videos MSRVTT.zip with videoN.mp4) and extract both into the manual directory.
  """

  def check_raw_data(self, manual_dir):
    """The base checks, then each annotation file at the top or in msrvtt_data/."""
    path = super().check_raw_data(manual_dir)
    for name in (_DATA_JSON, _TRAIN_CSV, _TEST_CSV):
      _find(path, name)
    return path

  def _split_items(self, manual_dir):
    data_path = _find(manual_dir, _DATA_JSON)
    train_path = _find(manual_dir, _TRAIN_CSV)
    test_path = _find(manual_dir, _TEST_CSV)
    data = raw_files.read_json(data_path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
      raise base.RawDataError(f"{data_path}: expected an object with a 'sentences' list")
    captions = collections.defaultdict(list)
    for i, entry in enumerate(data["sentences"]):
      if (not isinstance(entry, dict) or not isinstance(entry.get("video_id"), str)
          or "caption" not in entry):
        self.skips.add("malformed_annotation", "train", data_path.name,
                       f"sentences[{i}] = {entry!r:.80}")
        continue
      captions[entry["video_id"]].append(entry["caption"])
    videos = VideoIndex(manual_dir)

    def video_path(video_id):
      return videos.find(f"{video_id}.mp4", f"{video_id}.webm", video_id)

    train = []
    for i, row in enumerate(raw_files.read_csv(train_path, ("video_id",))):
      video_id = (row.get("video_id") or "").strip()
      if not video_id:
        self.skips.add("malformed_annotation", "train", train_path.name, f"row {i + 2}: {row}")
        continue
      train.append(base.VideoItem(video_id, video_path(video_id), list(captions.get(video_id, [])),
                                  where=f"{train_path.name}:{video_id}"))
    test = []
    for i, row in enumerate(raw_files.read_csv(test_path, ("video_id", "sentence"))):
      video_id = (row.get("video_id") or "").strip()
      if not video_id or row.get("sentence") is None:
        self.skips.add("malformed_annotation", "test", test_path.name, f"row {i + 2}: {row}")
        continue
      test.append(base.VideoItem(video_id, video_path(video_id), [row["sentence"]],
                                 where=f"{test_path.name}:{video_id}"))
    return {"train": train, "test": test}
