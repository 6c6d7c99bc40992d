"""Renders a raw synthetic tree (mp4 clips + annotations.json) of any size or difficulty.

    python -m data_prep.synthetic --out RAW [--num_train 1024 --num_val 128 --num_test 256
        --duration 8 --fps 4 --video_resolution 64 --num_shapes 4 --num_colours 6 --num_sizes 2
        --num_backgrounds 4 --directions left,right,up,down --captions_per_video 3 --seed 0]
    python -m data_prep.build synthetic --manual_dir=RAW --data_dir=OUT [--num_frames 8
        --resolution 64]

Keep `--duration` >= the builder's `--num_frames` (frames are sampled at 1 fps).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from data_prep.synthetic import generate


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit code."""
  defaults = generate.SyntheticConfig()
  parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="raw directory to write (empty or missing)")
  for field in dataclasses.fields(generate.SyntheticConfig):
    value = getattr(defaults, field.name)
    if isinstance(value, tuple):
      kind = float if isinstance(value[0], float) else str
      parser.add_argument(f"--{field.name}", default=",".join(map(str, value)),
                          type=lambda s, kind=kind: tuple(kind(x) for x in s.split(",")),
                          help=f"comma-separated (default {','.join(map(str, value))})")
    else:
      parser.add_argument(f"--{field.name}", type=type(value), default=value,
                          help=f"(default {value})")
  parser.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    config = generate.SyntheticConfig(**{f.name: getattr(args, f.name)
                                         for f in dataclasses.fields(generate.SyntheticConfig)})
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  start = time.time()
  path = generate.write_raw(config, args.out, progress=not args.no_progress,
                            workers=args.workers)
  print(f"wrote {path} ({time.time() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
