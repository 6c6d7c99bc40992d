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

Connections: no thread waits on a client that has not finished sending its request. One reader
thread holds every connection whose request line and headers are still arriving (non-blocking
sockets, one selector) and hands a connection to a fixed pool of `workers` threads only once its
header block is complete. Slow or stalled clients therefore cost a file descriptor, never a
thread: the server runs at most `workers` + 2 threads (pool, reader, the `serve_forever` caller)
however many connections are open. A request's line and headers must arrive within
`header_timeout` seconds in total (also the limit for an idle keep-alive connection; a client
trickling one byte at a time is cut off too), answered 408; a header block over
`MAX_HEADER_BYTES` is answered 431; beyond `max_pending` waiting connections the oldest waiting
one is closed, so a new client always gets in. While a worker answers, each socket read or write
has `io_timeout` seconds.

Index updates: every request first asks the searcher to pick up a newer index version (one stat
of the index's `CURRENT` pointer when nothing changed), so a rebuild by `python -m tvr_jax.index`
is served without a restart.
"""

from __future__ import annotations

import collections
import concurrent.futures
import http.server
import io
import json
import mimetypes
import os
import re
import selectors
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from typing import Optional

from data_prep.frames import VideoError
from tvr_jax.video_search import index as index_lib

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

DEFAULT_WORKERS = 8            # threads answering requests whose headers have arrived
DEFAULT_HEADER_TIMEOUT = 20.0  # seconds for a request line + headers (and keep-alive idle time)
DEFAULT_IO_TIMEOUT = 30.0      # seconds per socket read / write while a request is answered
DEFAULT_MAX_PENDING = 512      # connections waiting for their headers; beyond it the oldest goes
MAX_HEADER_BYTES = 65536       # request line + headers
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _headers_complete(buffer) -> bool:
  """True once `buffer` holds a whole request line + header block (ends with an empty line)."""
  return _HEADER_END.search(buffer) is not None


class _SocketReader:
  """A connection's `rfile`: first the bytes the reader thread already took, then the socket.

  Whatever is left unread after a request (the start of a pipelined next request) stays in
  `buffer`, so the connection can go back to the reader thread without losing it.
  """

  def __init__(self, sock: socket.socket, prefix: bytes = b""):
    self._sock = sock
    self.buffer = bytearray(prefix)
    self.closed = False

  def _fill(self) -> bool:
    data = self._sock.recv(1 << 16)   # the socket's timeout (io_timeout) bounds the wait
    self.buffer += data
    return bool(data)

  def readline(self, limit: int = -1) -> bytes:
    while True:
      end = self.buffer.find(b"\n", 0, limit if limit > 0 else None)
      if end >= 0:
        n = end + 1
        break
      if (limit > 0 and len(self.buffer) >= limit) or not self._fill():
        n = len(self.buffer) if limit <= 0 else min(limit, len(self.buffer))
        break
    line = bytes(self.buffer[:n])
    del self.buffer[:n]
    return line

  def read(self, size: int = -1) -> bytes:
    while (size < 0 or len(self.buffer) < size) and self._fill():
      pass
    n = len(self.buffer) if size < 0 else min(size, len(self.buffer))
    data = bytes(self.buffer[:n])
    del self.buffer[:n]
    return data

  def close(self) -> None:
    self.closed = True


class _SocketWriter(io.BufferedIOBase):
  """A connection's `wfile`: unbuffered, every write is a `sendall`."""

  def __init__(self, sock: socket.socket):
    self._sock = sock

  def writable(self) -> bool:
    return True

  def write(self, b) -> int:
    self._sock.sendall(b)
    with memoryview(b) as view:
      return view.nbytes

  def fileno(self) -> int:
    return self._sock.fileno()


class SearchHandler(http.server.BaseHTTPRequestHandler):
  """Request handler; `server.searcher` is a `retrieve.Searcher`."""

  server_version = "tvr-search/1"
  protocol_version = "HTTP/1.1"

  def __init__(self, request, client_address, server, prefix: bytes = b""):
    self._prefix = prefix
    super().__init__(request, client_address, server)

  def setup(self):
    self.connection = self.request
    self.connection.settimeout(self.server.io_timeout)
    self.rfile = _SocketReader(self.connection, self._prefix)
    self.wfile = _SocketWriter(self.connection)

  def handle(self):
    """Answers the request whose headers arrived, then any complete pipelined ones after it; the
    server takes the connection back for the next request (keep-alive) unless it must close."""
    self.close_connection = True
    self.handle_one_request()
    while not self.close_connection and _headers_complete(self.rfile.buffer):
      self.handle_one_request()

  def parse_request(self) -> bool:
    if not super().parse_request():
      return False
    length = (self.headers.get("Content-Length") or "0").strip()
    if length != "0" or "Transfer-Encoding" in self.headers:
      self.close_connection = True   # request bodies are never read: the stream cannot be reused
    return True

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
    if self.close_connection:
      self.send_header("Connection", "close")
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
    index = self.server.current_index()
    if path == "/api/search":
      return self._search(urllib.parse.parse_qs(url.query), index)
    for prefix, fn in (("/thumb/", self._thumb), ("/media/", self._media)):
      if path.startswith(prefix):
        vid = path[len(prefix):]
        if not _ID.match(vid) or vid not in index.by_id:
          return self._error(404, "unknown video id")
        return fn(vid, index)
    return self._error(404, "not found")

  def _host_ok(self) -> bool:
    if not getattr(self.server, "loopback_only", False):
      return True
    host = (self.headers.get("Host") or "").strip()
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name in _LOOPBACK

  def _search(self, params: dict, index: index_lib.SearchIndex) -> None:
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
        if video not in index.by_id:   # the API takes indexed ids only, never paths
          return self._error(404, "unknown video id")
        result = searcher.search_video(video, top)
      elif query.strip():
        result = searcher.search_text(query[:1000], top)
      else:
        return self._error(400, "give q=TEXT or video=ID")
    except FileNotFoundError:   # the id left the index in a rebuild since the check above
      return self._error(404, "unknown video id")
    except (ValueError, VideoError) as e:
      return self._error(400, str(e))
    results = [{"rank": h.rank, "id": h.id, "file": h.relpath, "score": h.score,
                "first_stage": h.first_stage, "duration": h.duration,
                "thumb": f"/thumb/{h.id}", "media": f"/media/{h.id}"} for h in result.hits]
    self._json(200, {"query": query, "video": video, "results": results,
                     "timings": result.timings, "indexed": len(searcher.index)})

  def _thumb(self, vid: str, index: index_lib.SearchIndex) -> None:
    for retry in (False, True):
      try:
        with open(index.thumbnail_path(vid), "rb") as f:
          return self._send(200, f.read(), "image/jpeg")
      except OSError:
        if retry:
          break
      # A rebuild may have replaced (and deleted) this version since the request began.
      index = self.server.current_index()
      if vid not in index.by_id:
        break
    return self._error(404, "thumbnail missing")

  def _media(self, vid: str, index: index_lib.SearchIndex) -> None:
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


class _ConnectionReader(threading.Thread):
  """Holds connections until their request line and headers are complete (see module docstring).

  One thread, one selector, non-blocking sockets; waiting connections are kept oldest first, so
  expiry and eviction look only at the front.
  """

  def __init__(self, server: "SearchServer"):
    super().__init__(name="tvr-search-reader", daemon=True)
    self._server = server
    self._selector = selectors.DefaultSelector()
    self._wake_r, self._wake_w = socket.socketpair()
    self._wake_r.setblocking(False)
    self._wake_w.setblocking(False)
    self._selector.register(self._wake_r, selectors.EVENT_READ)
    self._incoming: collections.deque = collections.deque()   # (sock, address, buffered bytes)
    self._waiting: "collections.OrderedDict[socket.socket, list]" = collections.OrderedDict()
    self._stopping = False

  def add(self, sock: socket.socket, address, buffered: bytes = b"") -> None:
    """Hands a connection over (from any thread); `buffered` = bytes of it already read."""
    self._incoming.append((sock, address, buffered))
    self._wake()

  def stop(self) -> None:
    self._stopping = True
    self._wake()

  def _wake(self) -> None:
    try:
      self._wake_w.send(b"x")
    except (BlockingIOError, OSError):
      pass   # a wake-up is already pending (or the reader has closed)

  def run(self) -> None:
    try:
      while not self._stopping:
        try:
          self._step()
        except Exception:  # noqa: BLE001 - the reader must outlive any one bad connection
          traceback.print_exc()
    finally:
      for sock in list(self._waiting):
        self._drop(sock)
      for sock, _, _ in self._incoming:
        _close(sock)
      self._selector.close()
      self._wake_r.close()
      self._wake_w.close()

  def _step(self) -> None:
    """Takes new connections, reads whatever arrived (waiting at most until the oldest deadline
    or 1 s), then expires connections past their deadline."""
    self._take_incoming()
    timeout = 1.0
    if self._waiting:
      oldest = next(iter(self._waiting.values()))
      timeout = min(timeout, max(0.0, oldest[2] - time.monotonic()))
    for key, _ in self._selector.select(timeout):
      if key.fileobj is self._wake_r:
        try:
          while self._wake_r.recv(4096):
            pass
        except BlockingIOError:
          pass
      else:
        self._read(key.fileobj)
    self._expire()

  def _take_incoming(self) -> None:
    while self._incoming:
      sock, address, buffered = self._incoming.popleft()
      while len(self._waiting) >= self._server.max_pending:
        self._drop(next(iter(self._waiting)))   # the oldest waiting connection makes room
      sock.setblocking(False)
      deadline = time.monotonic() + self._server.header_timeout
      self._waiting[sock] = [address, bytearray(buffered), deadline]
      if _headers_complete(buffered):
        self._dispatch(sock)
      else:
        self._selector.register(sock, selectors.EVENT_READ)

  def _read(self, sock: socket.socket) -> None:
    entry = self._waiting.get(sock)
    if entry is None:
      return
    try:
      data = sock.recv(1 << 16)
    except BlockingIOError:
      return
    except OSError:
      data = b""
    if not data:   # the client went away
      self._drop(sock)
      return
    entry[1] += data
    if _headers_complete(entry[1]):
      self._dispatch(sock)
    elif len(entry[1]) > MAX_HEADER_BYTES:
      self._drop(sock, b"431 Request Header Fields Too Large")

  def _expire(self) -> None:
    now = time.monotonic()
    while self._waiting:
      sock, (_, buffered, deadline) = next(iter(self._waiting.items()))
      if deadline > now:
        break
      # Silence for an idle keep-alive connection; 408 to one that had started a request.
      self._drop(sock, b"408 Request Timeout" if buffered else None)

  def _forget(self, sock: socket.socket) -> list:
    entry = self._waiting.pop(sock)
    try:
      self._selector.unregister(sock)
    except (KeyError, ValueError):
      pass   # dispatched straight from `add`, never registered
    return entry

  def _dispatch(self, sock: socket.socket) -> None:
    address, buffered, _ = self._forget(sock)
    sock.setblocking(True)
    try:
      self._server.submit(sock, address, bytes(buffered))
    except RuntimeError:   # the pool is shut down: the server is closing
      _close(sock)

  def _drop(self, sock: socket.socket, status: Optional[bytes] = None) -> None:
    self._forget(sock)
    if status is not None:
      try:   # best effort, never blocks: the socket is non-blocking
        sock.send(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
      except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
  """Closes a client connection, draining what it sent first (so the close is a FIN, not a RST
  that could discard a 408/431 answer still in flight)."""
  try:
    sock.setblocking(False)
    for _ in range(16):
      if not sock.recv(1 << 16):
        break
  except OSError:
    pass
  try:
    sock.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass
  sock.close()


class SearchServer(http.server.HTTPServer):
  """HTTP server holding the searcher: a connection reader thread plus a fixed worker pool."""

  request_queue_size = 128   # listen backlog: bursts of connections wait in the kernel

  def __init__(self, address, searcher, verbose: bool = False, *, workers: int = DEFAULT_WORKERS,
               header_timeout: float = DEFAULT_HEADER_TIMEOUT,
               io_timeout: float = DEFAULT_IO_TIMEOUT, max_pending: int = DEFAULT_MAX_PENDING):
    if workers < 1 or max_pending < 1 or header_timeout <= 0 or io_timeout <= 0:
      raise ValueError(f"SearchServer: workers ({workers}) and max_pending ({max_pending}) must be "
                       f">= 1, header_timeout ({header_timeout}) and io_timeout ({io_timeout}) > 0")
    super().__init__(address, SearchHandler)
    self.searcher = searcher
    self.verbose = verbose
    self.loopback_only = address[0] in ("127.0.0.1", "localhost", "::1")
    self.header_timeout = float(header_timeout)
    self.io_timeout = float(io_timeout)
    self.max_pending = int(max_pending)
    self._closing = False
    self._reload_error: Optional[str] = None
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, "tvr-search-worker")
    self._reader = _ConnectionReader(self)
    self._reader.start()

  def current_index(self) -> index_lib.SearchIndex:
    """The searcher's index after picking up a newer version, if a build committed one.

    A version that cannot be used (corrupt, built by another model) is reported once on stderr
    and the loaded one stays in service.
    """
    try:
      if self.searcher.refresh() and self.verbose:
        sys.stderr.write(f"index updated: {len(self.searcher.index)} videos\n")
    except index_lib.IndexFormatError as e:
      if str(e) != self._reload_error:
        self._reload_error = str(e)
        sys.stderr.write(f"index not reloaded, still serving the previous version: {e}\n")
    return self.searcher.index

  def process_request(self, request, client_address) -> None:
    """Called by `serve_forever` for each accepted connection: the reader takes it (no thread)."""
    self._reader.add(request, client_address)

  def submit(self, sock: socket.socket, address, buffered: bytes) -> None:
    """Queues a connection whose headers have arrived for a worker."""
    self._pool.submit(self._serve_connection, sock, address, buffered)

  def _serve_connection(self, sock: socket.socket, address, buffered: bytes) -> None:
    handler = None
    try:
      handler = self.RequestHandlerClass(sock, address, self, buffered)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
      pass   # the client went away or stopped reading: nothing to report
    except Exception:  # noqa: BLE001 - one failed request must not end the worker
      self.handle_error(sock, address)
    if handler is not None and not handler.close_connection and not self._closing:
      self._reader.add(sock, address, bytes(handler.rfile.buffer))   # keep-alive
    else:
      _close(sock)

  def server_close(self) -> None:
    self._closing = True
    super().server_close()
    self._reader.stop()
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._reader.join(5)


def make_server(searcher, host: str = "127.0.0.1", port: int = 8000, verbose: bool = True,
                **options) -> SearchServer:
  """A ready-to-serve `SearchServer` (port 0 picks a free port; see `server_address`).

  `options`: `workers`, `header_timeout`, `io_timeout`, `max_pending` (see the module docstring).
  """
  return SearchServer((host, port), searcher, verbose=verbose, **options)
