"""Locating, building and opening the TFDS splits that `data_prep` writes, from a run config.

The trainer, the evaluator and the benchmarks all find a dataset the same way:

    path = dataset_dir(config)              # DATA_DIR/<dataset>/f<F>_r<R>_.../<version>
    split = open_split(config, "test")      # a VideoSplit whose frames fit the model
    cache = frame_cache(config, split)      # decoded frames in RAM, when config.cache_frames

`check_inputs(config)` stops a run at once, saying what to download and which command prepares it,
when the converted CLIP or the dataset is missing (the synthetic set is built instead).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from data_prep import reading
from tvr_jax.data.cache import FrameCache
from tvr_jax.data.source import VideoSplit


class MissingInputError(FileNotFoundError):
  """The converted CLIP or dataset a config names is missing (the message says how to get it)."""


def _frame_config_prefix(config: ml_collections.ConfigDict) -> str:
  """Builder config names start with the frame layout: `f<num_frames>_r<resolution>_`."""
  return f"f{config.num_frames}_r{config.image_size}_"


def dataset_dir(config: ml_collections.ConfigDict) -> str | None:
  """The TFDS version directory of `config.dataset` with `num_frames` frames at `image_size` px.

  `data_prep.build` writes `DATA_DIR/<dataset>/f<F>_r<R>_.../<version>/`; among the builder configs
  with this frame layout, the newest complete version wins (versions compare as TFDS versions,
  `data_prep.reading.dataset_path`). `config.data_dir` may also point at a version directory.
  Returns None when nothing matching is built.
  """
  root = os.path.abspath(os.path.expanduser(config.data_dir))
  if os.path.isfile(os.path.join(root, "dataset_info.json")):
    return root
  base_dir = os.path.join(root, config.dataset)
  if not os.path.isdir(base_dir):
    return None
  candidates = []
  for name in sorted(os.listdir(base_dir)):
    if not name.startswith(_frame_config_prefix(config)):
      continue
    try:
      path = reading.dataset_path(root, config.dataset, config=name)
    except FileNotFoundError:   # only incomplete builds of this config
      continue
    candidates.append((tfds.core.Version(path.name), name, os.fspath(path)))
  return max(candidates)[2] if candidates else None


def require_dataset_dir(config: ml_collections.ConfigDict) -> str:
  """`dataset_dir(config)`, or FileNotFoundError saying how to prepare the dataset."""
  path = dataset_dir(config)
  if path is None:
    raise MissingInputError(
        f"dataset {config.dataset!r} with {config.num_frames} frames at {config.image_size} px is "
        f"not built under config.data_dir={config.data_dir!r}. Download the raw videos and "
        "annotations (layouts: docs/datasets.md) and prepare them once:\n"
        f"  python -m data_prep.build {config.dataset} --manual_dir=/path/to/{config.dataset} "
        f"--data_dir={config.data_dir} --num_frames={config.num_frames} "
        f"--resolution={config.image_size}")
  return path


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Stops at once, saying what to download and run, when the CLIP or the dataset is missing.

  The synthetic set (`config.build_if_missing`) is built here instead.
  """
  if config.init_from and not os.path.isfile(os.path.join(config.init_from, "clip_config.json")):
    raise MissingInputError(
        f"config.init_from={config.init_from!r} is not a converted CLIP checkpoint. Download "
        "OpenAI's ViT-B-32.pt (or ViT-B-16.pt) and convert it once:\n"
        f"  python -m tvr_jax.convert --src ViT-B-32.pt --out {config.init_from}\n"
        "or set --config.init_from='' to train a CLIP of config.clip_preset from scratch.")
  if dataset_dir(config) is not None:
    return
  if config.build_if_missing:
    build_dataset(config)
    return
  require_dataset_dir(config)   # raises with the command to run


def build_dataset(config: ml_collections.ConfigDict) -> None:
  """Builds `config.dataset` (the synthetic set) into `config.data_dir`; process 0 builds."""
  from data_prep import build as build_lib   # heavy (renderer, builders): only when building
  if jax.process_index() == 0:
    print(f"building dataset {config.dataset!r} into {config.data_dir} (first use only)...",
          flush=True)
    summary = build_lib.build(config.dataset, None, config.data_dir, num_frames=config.num_frames,
                              resolution=config.image_size, workers=os.cpu_count() or 1)
    logging.info("%s", build_lib.format_summary(summary))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("dataset built")


def open_split(config: ml_collections.ConfigDict, split: str) -> VideoSplit:
  """Opens one split and checks that its frames fit the model (`num_frames`, `image_size`)."""
  opened = VideoSplit.open(require_dataset_dir(config), split, progress=config.progress_bar)
  if opened.resolution != config.image_size or opened.num_frames != config.num_frames:
    raise ValueError(f"{opened.data_dir}: frames are {opened.num_frames} x {opened.resolution} px, "
                     f"the config wants num_frames={config.num_frames}, "
                     f"image_size={config.image_size}")
  return opened


def subset_split(split: VideoSplit, num_videos: int) -> VideoSplit:
  """The first `num_videos` videos of `split` (smoke runs evaluate on a prefix)."""
  return dataclasses.replace(split, video_ids=list(split.video_ids[:num_videos]),
                             captions=list(split.captions[:num_videos]))


def frame_cache(config: ml_collections.ConfigDict, split: VideoSplit) -> FrameCache | None:
  """A filled RAM frame cache of `split` when `config.cache_frames`, else None."""
  if not config.cache_frames:
    return None
  return FrameCache.fill(split, worker_count=config.num_workers)
