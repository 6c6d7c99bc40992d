"""Dataset preparation: frame extraction, TFDS builders, `python -m data_prep.build DATASET ...`.

`load_split(data_dir, dataset, split, config=None)` opens a built split for reading (see
`data_prep.reading` for the example layout). Importing this package stays light; TFDS loads on use.
"""

from __future__ import annotations

import os
from typing import Any


def load_split(data_dir: str | os.PathLike, dataset: str, split: str,
               config: str | None = None, version: str | None = None) -> Any:
  """Random-access data source of a built split (`tfds.builder_from_directory(...).as_data_source`).

  Each example: video_id bytes, frames list of F uint8 [R, R, 3], frame_mask int32 [F], captions
  bytes array [N], duration float32, and timestamps float32 [N, 2] for DiDeMo / ActivityNet.
  """
  from data_prep import reading  # pylint: disable=import-outside-toplevel
  return reading.load_split(data_dir, dataset, split, config, version)
