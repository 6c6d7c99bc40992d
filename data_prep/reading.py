"""Opens a built dataset split as a random-access data source (no TensorFlow), for Grain.

    source = data_prep.load_split("/data/tfds", "msrvtt", "test")      # default / only config
    example = source[0]

An example is a dict of numpy values:

    video_id    bytes                       b"video7010" (decode with .decode("utf-8"))
    frames      list of F uint8 [R, R, 3]   RGB, JPEG-decoded by Pillow; stack with np.stack(...)
    frame_mask  int32 [F]                   1 = real frame, 0 = black padding (padding comes last)
    captions    object array [N] of bytes   every caption of the video
    timestamps  float32 [N, 2]              DiDeMo / ActivityNet only: each caption's (start, end) s
    duration    float32 scalar              seconds

`dataset_metadata(...)["metadata"]` gives fps, num_frames, resolution and jpeg_quality of a build.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath
import tensorflow_datasets as tfds


def _versions(config_dir: epath.Path) -> list[epath.Path]:
  out = []
  for path in config_dir.iterdir():
    if path.is_dir() and not path.name.startswith("incomplete."):
      try:
        out.append((tfds.core.Version(path.name), path))
      except ValueError:
        continue
  return [p for _, p in sorted(out, key=lambda vp: vp[0])]


def dataset_path(data_dir: str | os.PathLike, dataset: str, config: str | None = None,
                 version: str | None = None) -> epath.Path:
  """`data_dir/dataset/config/version` of a built dataset.

  `config` None picks the dataset's only config, or the default config recorded at build time when
  there are several; `version` None picks the newest built version.

  Raises:
    FileNotFoundError: naming what is missing and what is there.
  """
  root = epath.Path(data_dir) / dataset
  if not root.is_dir():
    raise FileNotFoundError(f"no dataset {dataset!r} under {data_dir} (build it with "
                            f"`python -m data_prep.build {dataset} ...`)")
  configs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if config is None:
    if len(configs) == 1:
      config = configs[0]
    else:
      default_file = root / ".config" / "metadata.json"
      default = (json.loads(default_file.read_text()).get("default_config_name")
                 if default_file.exists() else None)
      if default not in configs:
        raise FileNotFoundError(f"{root} holds configs {configs}; pass config=")
      config = default
  config_dir = root / config
  if not config_dir.is_dir():
    raise FileNotFoundError(f"no config {config!r} of {dataset} under {root}; built: {configs}")
  if version is not None:
    path = config_dir / version
    if not path.is_dir():
      raise FileNotFoundError(f"no version {version} in {config_dir}")
    return path
  versions = _versions(config_dir)
  if not versions:
    raise FileNotFoundError(f"{config_dir} holds no complete build (an interrupted build leaves "
                            "only incomplete.* directories; re-run the build)")
  return versions[-1]


def load_split(data_dir: str | os.PathLike, dataset: str, split: str,
               config: str | None = None, version: str | None = None) -> Any:
  """Random-access data source of one split (see the module docstring for the example layout)."""
  path = dataset_path(data_dir, dataset, config, version)
  builder = tfds.builder_from_directory(os.fspath(path))
  if split not in builder.info.splits:
    raise KeyError(f"{dataset} at {path} has no split {split!r}; splits: "
                   f"{sorted(builder.info.splits)}")
  return builder.as_data_source(split)


def dataset_metadata(data_dir: str | os.PathLike, dataset: str,
                     config: str | None = None) -> dict[str, Any]:
  """Path, splits with sizes, and frame metadata (fps, num_frames, resolution) of a build."""
  path = dataset_path(data_dir, dataset, config)
  builder = tfds.builder_from_directory(os.fspath(path))
  return {"path": os.fspath(path), "config": builder.builder_config.name
          if builder.builder_config else None,
          "splits": {k: v.num_examples for k, v in builder.info.splits.items()},
          "metadata": dict(builder.info.metadata or {})}
