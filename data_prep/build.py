r"""Builds one dataset as TFDS array_record files from its raw download.

    python -m data_prep.build DATASET --manual_dir=RAW --data_dir=OUT \
        [--num_frames=F] [--fps=1] [--resolution=224] [--jpeg_quality=95] [--workers=N]

DATASET is one of `data_prep.builders.available()` (msrvtt, msvd, didemo, activitynet, synthetic).
Frame options left out take the dataset's default config (1 fps, 224 px, JPEG quality 95; F = 12 for
MSR-VTT and MSVD, 64 for DiDeMo and ActivityNet).
The dataset lands in OUT/DATASET/CONFIG/VERSION/ (CONFIG such as `f12_r224_fps1_q95`); a summary
(examples per split, skipped items by kind with their file names) is printed and written as
`build_summary.json` beside it, in that directory.

A build that stops half-way (exception, kill, power loss) leaves nothing in the final directory:
TFDS writes into a sibling `incomplete.*` directory and renames it at the end. A re-run removes such
leftovers of the same version and builds again from scratch; do not run two builds of the same
dataset config at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from data_prep import base
from data_prep import builders

SUMMARY_FILE = "build_summary.json"
log = logging.getLogger(__name__)


def make_builder(dataset: str, data_dir: str | os.PathLike, *, num_frames: int | None = None,
                 fps: float | None = None, resolution: int | None = None,
                 jpeg_quality: int | None = None, workers: int = 1,
                 progress: bool = True) -> base.VideoTextBuilder:
  """The builder of `dataset` for these frame options (None: the dataset's default config value)."""
  cls = builders.builder_class(dataset)
  default = cls.BUILDER_CONFIGS[0]
  config = base.make_config(
      fps=default.fps if fps is None else fps,
      num_frames=default.num_frames if num_frames is None else num_frames,
      resolution=default.resolution if resolution is None else resolution,
      jpeg_quality=default.jpeg_quality if jpeg_quality is None else jpeg_quality)
  # TFDS refuses a new config object named like one of the class's: use the class's own.
  config = next((c for c in cls.BUILDER_CONFIGS if c.name == config.name), config)
  return cls(config=config, data_dir=os.fspath(data_dir), workers=workers, progress=progress)


def remove_stale_incomplete(builder: base.VideoTextBuilder) -> list[str]:
  """Deletes `incomplete.*` directories left by an interrupted build of this config and version."""
  data_path = epath.Path(builder.data_path)
  removed = []
  if data_path.parent.exists():
    for path in data_path.parent.glob(f"incomplete.*_{data_path.name}"):
      if path.is_dir():
        path.rmtree()
        removed.append(os.fspath(path))
        log.warning("removed the leftover of an interrupted build: %s", path)
  return removed


def build(dataset: str, manual_dir: str | os.PathLike | None, data_dir: str | os.PathLike,
          **options: Any) -> dict[str, Any]:
  """Builds `dataset` (if not built yet) and returns the build summary (see module docstring).

  Args:
    dataset: builder name.
    manual_dir: the raw download.
    data_dir: TFDS data directory to write into.
    **options: `make_builder` options (num_frames, fps, resolution, jpeg_quality, workers,
      progress).

  Raises:
    base.RawDataError: missing manual directory or annotation file (nothing is written).
  """
  builder = make_builder(dataset, data_dir, **options)
  summary_path = epath.Path(builder.data_path) / SUMMARY_FILE
  if epath.Path(builder.data_path).exists():
    log.warning("%s already exists; not rebuilding", builder.data_path)
    if summary_path.exists():
      summary = json.loads(summary_path.read_text())
    else:
      summary = {"dataset": dataset, "config": builder.builder_config.name,
                 "data_path": os.fspath(builder.data_path)}
    summary["reused"] = True
    return summary
  builder.check_raw_data(manual_dir)  # fail before anything is written
  removed = remove_stale_incomplete(builder)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)
                                                   if manual_dir else None))
  summary = builder.build_summary()
  summary["examples"] = {name: info.num_examples for name, info in builder.info.splits.items()}
  summary["removed_incomplete"] = removed
  summary["reused"] = False
  summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """Human-readable lines of a build summary."""
  lines = [f"{summary.get('dataset')} [{summary.get('config')}] -> {summary.get('data_path')}"
           + ("  (already built)" if summary.get("reused") else "")]
  for split, n in sorted(summary.get("examples", {}).items()):
    lines.append(f"  {split:>8}: {n} examples")
  skipped = summary.get("skipped", {})
  by_kind = skipped.get("by_kind", {})
  lines.append("  skipped: " + (", ".join(f"{k}={v}" for k, v in by_kind.items()) or "none"))
  for record in skipped.get("records", [])[:50]:
    lines.append(f"    [{record['split']}] {record['kind']}: {record['where']}"
                 + (f" ({record['detail']})" if record.get("detail") else ""))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the process exit code."""
  parser = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=builders.available())
  parser.add_argument("--manual_dir", default=None,
                      help="raw download directory (required by the real datasets)")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  parser.add_argument("--num_frames", type=int, default=None,
                      help="frames per video F (default: the dataset's, 12 or 64)")
  parser.add_argument("--fps", type=float, default=None, help="sampling rate (default 1)")
  parser.add_argument("--resolution", type=int, default=None, help="R (default 224)")
  parser.add_argument("--jpeg_quality", type=int, default=None, help="1-95 (default 95)")
  parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    summary = build(args.dataset, args.manual_dir, args.data_dir, num_frames=args.num_frames,
                    fps=args.fps, resolution=args.resolution, jpeg_quality=args.jpeg_quality,
                    workers=args.workers, progress=not args.no_progress)
  except base.RawDataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
