"""Finds video files under a raw dataset directory by file name or by name without extension.

CLIP4Clip's loaders walk the video folder and match ids to file names (MSVD, ActivityNet: name
without its extension; DiDeMo: the full file name; MSR-VTT: `<id>.mp4`, else `.webm`). One walk
builds an index that answers all of those look-ups.
"""

from __future__ import annotations

import os

# Preference order when one id has several files (e.g. `video1.mp4` and `video1.webm`).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".3gp", ".3g2", ".flv",
                    ".mpg", ".mpeg", ".wmv", ".ogv", ".mts")


class VideoIndex:
  """Index of the video files under `root` (recursive), by full file name and by stem."""

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    self.by_name: dict[str, str] = {}
    self.by_stem: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
    best: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(self.root):
      dirnames.sort()
      for filename in sorted(filenames):
        stem, ext = os.path.splitext(filename)
        ext = ext.lower()
        if ext not in rank:
          continue
        path = os.path.join(dirpath, filename)
        self.by_name.setdefault(filename, path)
        if stem not in best or rank[ext] < best[stem]:
          best[stem] = rank[ext]
          self.by_stem[stem] = path

  def __len__(self) -> int:
    return len(self.by_name)

  def find(self, *names: str) -> str | None:
    """Path of the first of `names` found as a full file name or, failing that, as a stem."""
    for name in names:
      if name in self.by_name:
        return self.by_name[name]
    for name in names:
      if name in self.by_stem:
        return self.by_stem[name]
    return None
