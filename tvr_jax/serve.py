"""Serves the local search page and its JSON API.

    python -m tvr_jax.serve --index INDEX [--port 8000] [--host 127.0.0.1]

Binds to 127.0.0.1 by default (only this machine can connect). See docs/search.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  """Command-line entry: loads the model once, then serves until interrupted."""
  p = argparse.ArgumentParser(prog="python -m tvr_jax.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--index", required=True, help="index directory (python -m tvr_jax.index)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--checkpoint", help="model checkpoint (default: the one the index records)")
  p.add_argument("--shortlist", type=int, default=100, help="first-stage candidates re-scored")
  args = p.parse_args(argv)
  from tvr_jax.video_search import index as index_lib
  from tvr_jax.video_search import model as model_lib
  from tvr_jax.video_search import retrieve, server
  try:
    searcher = retrieve.load_searcher(args.index, args.checkpoint, shortlist=args.shortlist)
  except (model_lib.ModelLoadError, index_lib.IndexFormatError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  httpd = server.make_server(searcher, args.host, args.port)
  host, port = httpd.server_address[:2]
  print(f"serving {len(searcher.index)} videos at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
