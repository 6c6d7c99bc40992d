"""Searches an index from the command line and prints a ranked table.

    python -m tvr_jax.search --index INDEX "a man is slicing a tomato" [--top 10]
    python -m tvr_jax.search --index INDEX --video PATH_OR_ID [--top 10]

The model is the one recorded in the index (or --checkpoint, which must be the same model).
See docs/search.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def main(argv: list[str] | None = None) -> int:
  """Command-line entry; returns the exit status (1 on a clear user error)."""
  p = argparse.ArgumentParser(prog="python -m tvr_jax.search", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("query", nargs="?", help="text query")
  p.add_argument("--index", required=True, help="index directory (python -m tvr_jax.index)")
  p.add_argument("--video", help="video query: a video file or an indexed video id")
  p.add_argument("--top", type=int, default=10, help="results shown")
  p.add_argument("--shortlist", type=int, default=100, help="first-stage candidates re-scored")
  p.add_argument("--checkpoint", help="model checkpoint (default: the one the index records)")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  args = p.parse_args(argv)
  if (args.query is None) == (args.video is None):
    p.error("give either a text query or --video")
  if args.top < 1:
    p.error("--top must be >= 1")
  from data_prep.frames import VideoError
  from tvr_jax.video_search import index as index_lib
  from tvr_jax.video_search import model as model_lib
  from tvr_jax.video_search import retrieve
  try:
    searcher = retrieve.load_searcher(args.index, args.checkpoint, shortlist=args.shortlist)
    if args.video is not None:
      result = searcher.search_video(args.video, args.top)
    else:
      result = searcher.search_text(args.query, args.top)
  except (model_lib.ModelLoadError, index_lib.IndexFormatError, FileNotFoundError, VideoError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps({"hits": [dataclasses.asdict(h) for h in result.hits],
                      "timings": result.timings}, indent=1))
  else:
    print(retrieve.format_table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
