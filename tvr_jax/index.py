"""Builds or updates a search index over a folder of videos.

    python -m tvr_jax.index --checkpoint CKPT --videos DIR --out INDEX [--workers N] [--rebuild]

CKPT: a training work directory (newest checkpoint), one of its step directories, or a converted
CLIP directory (zero-shot). Re-running updates the index: new or changed videos are encoded,
deleted ones dropped, the rest reused. See docs/search.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
  """Command-line entry; returns the exit status (1 on a clear user error)."""
  p = argparse.ArgumentParser(prog="python -m tvr_jax.index", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="training workdir, step dir or converted CLIP")
  p.add_argument("--videos", required=True, help="folder of videos (scanned recursively)")
  p.add_argument("--out", required=True, help="index directory (created or updated)")
  p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                 help="frame-extraction processes")
  p.add_argument("--batch_size", type=int, default=16, help="videos per encoder call")
  p.add_argument("--rebuild", action="store_true",
                 help="ignore an existing index (even one of another model) and encode everything")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  from tvr_jax.video_search import index as index_lib
  from tvr_jax.video_search import model as model_lib
  try:
    model = model_lib.load_retrieval_model(args.checkpoint, video_batch=args.batch_size)
    summary = index_lib.build_index(model, args.videos, args.out, workers=args.workers,
                                    batch_size=args.batch_size, progress=not args.no_progress,
                                    rebuild=args.rebuild,
                                    checkpoint=os.path.abspath(args.checkpoint))
  except (model_lib.ModelLoadError, index_lib.IndexFormatError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary.format())
  return 0


if __name__ == "__main__":
  sys.exit(main())
