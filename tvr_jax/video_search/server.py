"""The local search page and its JSON API, on the standard library's ThreadingHTTPServer.

Routes (GET only):

    /                         the page (static/index.html)
    /static/app.js, .css      the page's script and style (a fixed list, never a path from the URL)
    /api/search?q=TEXT&top=N  text query -> JSON {query, results: [...], timings}
    /api/search?video=ID&top=N   videos like an indexed video
    /thumb/<id>               an indexed video's thumbnail
    /media/<id>               an indexed video's file, with HTTP Range support (seeking)

Safety: files are looked up by id in the index (ids are 16 hex digits; a path in the request is
never opened), so path traversal cannot reach anything else; every response carries a strict
Content-Security-Policy (scripts from this origin only, no inline script), `nosniff` and no
referrer; the page builds results with `textContent`, never `innerHTML`. The server binds to
127.0.0.1 by default and, when bound to loopback, answers only requests whose Host header names a
loopback address (DNS-rebinding protection).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import mimetypes
import os
import re
import sys
import urllib.parse
from typing import Optional

from data_prep.frames import VideoError

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/static/style.css": ("style.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
_ID = re.compile(r"^[0-9a-f]{16}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MAX_TOP = 100
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class SearchHandler(http.server.BaseHTTPRequestHandler):
  """Request handler; `server.searcher` is a `retrieve.Searcher`."""

  server_version = "tvr-search/1"
  protocol_version = "HTTP/1.1"

  def log_message(self, format, *args):  # noqa: A002 - stdlib signature
    if getattr(self.server, "verbose", False):
      sys.stderr.write("%s - %s\n" % (self.address_string(), format % args))

  # -- responses -----------------------------------------------------------------------------
  def _headers(self, status: int, ctype: str, length: int, extra: Optional[dict] = None):
    self.send_response(status)
    self.send_header("Content-Type", ctype)
    self.send_header("Content-Length", str(length))
    self.send_header("Content-Security-Policy", CSP)
    self.send_header("X-Content-Type-Options", "nosniff")
    self.send_header("Referrer-Policy", "no-referrer")
    self.send_header("Cache-Control", "no-store")
    for k, v in (extra or {}).items():
      self.send_header(k, v)
    self.end_headers()

  def _send(self, status: int, body: bytes, ctype: str, extra: Optional[dict] = None):
    self._headers(status, ctype, len(body), extra)
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj) -> None:
    self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

  def _error(self, status: int, message: str) -> None:
    self._json(status, {"error": message})

  # -- routing -------------------------------------------------------------------------------
  def do_HEAD(self):  # noqa: N802 - stdlib name
    self.do_GET()

  def do_GET(self):  # noqa: N802 - stdlib name
    if not self._host_ok():
      return self._error(403, "unexpected Host header")
    url = urllib.parse.urlsplit(self.path)
    path = url.path
    if path in STATIC_FILES:
      name, ctype = STATIC_FILES[path]
      with open(os.path.join(STATIC_DIR, name), "rb") as f:
        return self._send(200, f.read(), ctype)
    if path == "/api/search":
      return self._search(urllib.parse.parse_qs(url.query))
    for prefix, fn in (("/thumb/", self._thumb), ("/media/", self._media)):
      if path.startswith(prefix):
        vid = path[len(prefix):]
        index = self.server.searcher.index
        if not _ID.match(vid) or vid not in index.by_id:
          return self._error(404, "unknown video id")
        return fn(vid)
    return self._error(404, "not found")

  def _host_ok(self) -> bool:
    if not getattr(self.server, "loopback_only", False):
      return True
    host = (self.headers.get("Host") or "").strip()
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name in _LOOPBACK

  def _search(self, params: dict) -> None:
    searcher = self.server.searcher
    try:
      top = int(params.get("top", ["10"])[0])
    except ValueError:
      return self._error(400, "top must be an integer")
    top = max(1, min(top, MAX_TOP))
    query = params.get("q", [""])[0]
    video = params.get("video", [""])[0]
    try:
      if video:
        if video not in searcher.index.by_id:   # the API takes indexed ids only, never paths
          return self._error(404, "unknown video id")
        result = searcher.search_video(video, top)
      elif query.strip():
        result = searcher.search_text(query[:1000], top)
      else:
        return self._error(400, "give q=TEXT or video=ID")
    except (ValueError, VideoError) as e:
      return self._error(400, str(e))
    results = [{"rank": h.rank, "id": h.id, "file": h.relpath, "score": h.score,
                "first_stage": h.first_stage, "duration": h.duration,
                "thumb": f"/thumb/{h.id}", "media": f"/media/{h.id}"} for h in result.hits]
    self._json(200, {"query": query, "video": video, "results": results,
                     "timings": result.timings, "indexed": len(searcher.index)})

  def _thumb(self, vid: str) -> None:
    path = self.server.searcher.index.thumbnail_path(vid)
    try:
      with open(path, "rb") as f:
        body = f.read()
    except OSError:
      return self._error(404, "thumbnail missing")
    self._send(200, body, "image/jpeg")

  def _media(self, vid: str) -> None:
    index = self.server.searcher.index
    path = index.videos[index.by_id[vid]].path
    try:
      f = open(path, "rb")
    except OSError:
      return self._error(404, "video file missing (re-run python -m tvr_jax.index)")
    with f:
      size = os.fstat(f.fileno()).st_size
      ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
      start, end, status = 0, size - 1, 200
      rng = self.headers.get("Range")
      if rng:
        m = _RANGE.match(rng.strip())
        if not m or (not m.group(1) and not m.group(2)):
          return self._send(416, b"", ctype, {"Content-Range": f"bytes */{size}"})
        if m.group(1):
          start = int(m.group(1))
          end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:   # suffix range: the last N bytes
          start = max(0, size - int(m.group(2)))
        if start >= size or start > end:
          return self._send(416, b"", ctype, {"Content-Range": f"bytes */{size}"})
        status = 206
      length = end - start + 1
      extra = {"Accept-Ranges": "bytes"}
      if status == 206:
        extra["Content-Range"] = f"bytes {start}-{end}/{size}"
      self._headers(status, ctype, length, extra)
      if self.command == "HEAD":
        return
      f.seek(start)
      remaining = length
      while remaining > 0:
        block = f.read(min(1 << 16, remaining))
        if not block:
          break
        try:
          self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError):   # the player cancelled (seek)
          return
        remaining -= len(block)


class SearchServer(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer holding the searcher."""
  daemon_threads = True

  def __init__(self, address, searcher, verbose: bool = False):
    super().__init__(address, SearchHandler)
    self.searcher = searcher
    self.verbose = verbose
    self.loopback_only = address[0] in ("127.0.0.1", "localhost", "::1")


def make_server(searcher, host: str = "127.0.0.1", port: int = 8000,
                verbose: bool = True) -> SearchServer:
  """A ready-to-serve `SearchServer` (port 0 picks a free port; see `server_address`)."""
  return SearchServer((host, port), searcher, verbose=verbose)
