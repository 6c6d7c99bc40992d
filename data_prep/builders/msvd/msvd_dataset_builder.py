"""MSVD (YouTube2Text): 1,200 / 100 / 670 videos, every caption kept.

Raw layout (CLIP4Clip's `msvd_data/` + `YouTubeClips/`):

    raw-captions.pkl   pickle {video id: [token list, ...]} (read WITHOUT executing pickled objects)
    train_list.txt     one video id per line (1,200); val_list.txt (100); test_list.txt (670)
    **/<id>.avi        the clips (any video extension is found; CLIP4Clip matches the name stem)

Each caption is its tokens joined with spaces, as CLIP4Clip does (`" ".join(cap)`).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import raw_files
from data_prep import base
from data_prep.video_index import VideoIndex

_CAPTIONS = "raw-captions.pkl"


def _join_tokens(tokens):
  """One caption from a token list, joined with spaces (bytes tokens of Python 2 pickles stay bytes
  for `base.check_caption` to decode); anything that is not a list of strings is returned as is, so
  `check_caption` counts it as malformed."""
  if isinstance(tokens, (list, tuple)):
    if all(isinstance(t, str) for t in tokens):
      return " ".join(tokens)
    if all(isinstance(t, (str, bytes)) for t in tokens):
      return b" ".join(t if isinstance(t, bytes) else t.encode("utf-8", "surrogateescape")
                       for t in tokens)
  return tokens


class Msvd(base.VideoTextBuilder):
  """MSVD text-video retrieval (train / val / test, several captions per video)."""

  name = "msvd"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = base.default_configs(num_frames=12)
  SPLITS = ("train", "val", "test")
  EVAL_SPLIT = "test"
  HAS_TIMESTAMPS = False
  REQUIRED_FILES = (_CAPTIONS, "train_list.txt", "val_list.txt", "test_list.txt")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download CLIP4Clip's MSVD package (https://github.com/ArrowLuo/CLIP4Clip, "Data Preparing":
  msvd_data.zip with raw-captions.pkl, train_list.txt, val_list.txt, test_list.txt) and the raw
  clips YouTubeClips.tar (https://www.cs.utexas.edu/users/ml/clamp/videoDescription/), and extract
  both into the manual directory (the clips may sit in any sub-folder, e.g. YouTubeClips/).
  """

  def _split_items(self, manual_dir):
    captions_path = manual_dir / _CAPTIONS
    captions = raw_files.read_pickle_safely(captions_path)
    if not isinstance(captions, dict):
      raise base.RawDataError(f"{captions_path}: expected a dict of video id -> token lists, got "
                              f"{type(captions).__name__}")
    # Python 2 pickles give bytes keys.
    captions = {(k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else k): v
                for k, v in captions.items()}
    videos = VideoIndex(manual_dir)
    result = {}
    for split in self.SPLITS:
      list_path = manual_dir / f"{split}_list.txt"
      items = []
      for video_id in raw_files.read_lines(list_path):
        entry = captions.get(video_id)
        if not isinstance(entry, list):
          self.skips.add("malformed_annotation", split, f"{list_path.name}:{video_id}",
                         f"{video_id} has no caption list in {_CAPTIONS}")
          continue
        items.append(base.VideoItem(
            video_id, videos.find(video_id), [_join_tokens(tokens) for tokens in entry],
            where=f"{list_path.name}:{video_id}"))
      result[split] = items
    return result
