"""The search server under hostile or changing conditions: hundreds of stalled (half-sent)
connections, slowly trickled headers, keep-alive and pipelined requests, and an index rebuilt
while the server runs. Real sockets on 127.0.0.1 only; every loop is bounded."""

import contextlib
import http.client
import json
import os
import socket
import threading

import pytest

from search_fixtures import ColourModel, make_video_folder, write_clip
from tvr_jax.video_search import index as index_lib
from tvr_jax.video_search import retrieve, server

STALLED = 300
# What a stalled client sends before it stops: nothing, part of the request line, part of the
# headers (no blank line yet).
PARTIAL = (b"", b"GET /api/sea", b"GET /api/search?q=red HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: 1")


@pytest.fixture(scope="module")
def colour_index(tmp_path_factory):
  root = tmp_path_factory.mktemp("robust")
  d = str(root / "videos")
  make_video_folder(d)
  out = str(root / "index")
  index_lib.build_index(ColourModel(), d, out, progress=False)
  return d, out


@contextlib.contextmanager
def _serving(index_dir, **kwargs):
  searcher = retrieve.Searcher(index_lib.SearchIndex.load(index_dir), ColourModel(), shortlist=4)
  httpd = server.make_server(searcher, "127.0.0.1", 0, verbose=False, **kwargs)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield httpd
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def _get(httpd, path):
  conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=30)
  try:
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()
  finally:
    conn.close()


def _is_open(sock) -> bool:
  """True while the server has neither closed the connection nor sent anything on it."""
  sock.setblocking(False)
  try:
    sock.recv(1, socket.MSG_PEEK)   # b"": closed; data: answered, so not waiting any more
    return False
  except BlockingIOError:
    return True
  except OSError:
    return False
  finally:
    sock.setblocking(True)


def _read_until_closed(sock, limit: int = 1 << 20) -> bytes:
  """Everything the server sends until it closes the connection (socket timeout bounds it)."""
  data = b""
  try:
    while len(data) < limit:
      block = sock.recv(1 << 16)
      if not block:
        break
      data += block
  except ConnectionResetError:   # closed with our unread bytes still queued: a reset, not a FIN
    pass
  return data


def test_stalled_connections_keep_threads_bounded(colour_index):
  """300 half-sent requests held open: the thread count stays bounded (no thread per waiting
  connection) and a normal search is answered while all of them are still open."""
  _, out = colour_index
  base = threading.active_count()
  with _serving(out) as httpd:
    assert _get(httpd, "/api/search?q=red&top=1")[0] == 200   # compiled once, before counting
    socks = []
    try:
      for i in range(STALLED):
        s = socket.create_connection(httpd.server_address[:2], timeout=30)
        socks.append(s)
        if PARTIAL[i % 3]:
          s.sendall(PARTIAL[i % 3])
      # The listening socket accepts in order, so once this answer arrives the server has taken
      # every stalled connection.
      status, body = _get(httpd, "/api/search?q=a%20blue%20thing&top=2")
      during = threading.active_count()
      still_open = sum(_is_open(s) for s in socks)
    finally:
      for s in socks:
        s.close()
  assert status == 200 and json.loads(body)["results"][0]["file"] == "blue_triangle.mp4"
  assert still_open == STALLED   # answered while every stalled connection was open
  assert during - base < STALLED // 10, f"{during - base} server threads for {STALLED} stalled"
  # serve_forever's thread, the connection reader and at most DEFAULT_WORKERS request workers.
  assert during - base <= 2 + server.DEFAULT_WORKERS, (base, during)


def test_trickled_headers_hit_the_header_deadline(colour_index):
  """A client sending one header line every 0.2 s (each read well inside any per-read timeout) is
  cut off by the total deadline for the request line and headers, answered 408."""
  _, out = colour_index
  with _serving(out, header_timeout=1.0) as httpd:
    s = socket.create_connection(httpd.server_address[:2], timeout=30)
    with s:
      s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
      closed = False
      for i in range(50):   # 10 s of trickling at most
        try:
          s.sendall(f"X-Trickle-{i}: 1\r\n".encode())
          s.settimeout(0.2)
          s.recv(1, socket.MSG_PEEK)   # returns once the server answers or closes
          closed = True
        except TimeoutError:
          continue
        except OSError:
          closed = True
        break
      s.settimeout(30)
      reply = _read_until_closed(s) if closed else b""
    assert closed, "the server kept reading trickled headers for 10 s"
    assert reply.startswith(b"HTTP/1.1 408") or reply == b""
    assert _get(httpd, "/api/search?q=red&top=1")[0] == 200


def test_connection_cap_drops_the_oldest_waiting(colour_index):
  """Beyond `max_pending` waiting connections the oldest waiting ones are closed, so a new client
  always gets in."""
  _, out = colour_index
  with _serving(out, max_pending=8) as httpd:
    socks = []
    try:
      for _ in range(20):
        s = socket.create_connection(httpd.server_address[:2], timeout=30)
        s.sendall(b"GET / HTTP/1.1\r\n")
        socks.append(s)
      status, _ = _get(httpd, "/api/search?q=red&top=1")
      open_flags = [_is_open(s) for s in socks]
    finally:
      for s in socks:
        s.close()
  assert status == 200
  assert not any(open_flags[:12]), open_flags           # the oldest were dropped
  assert all(open_flags[-7:]), open_flags               # the newest still wait
  assert sum(open_flags) <= 8


def test_keep_alive_and_pipelined_requests(colour_index):
  _, out = colour_index
  with _serving(out) as httpd:
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=30)
    try:
      for q in ("red", "a blue thing", "yellow"):   # one connection, three requests
        conn.request("GET", "/api/search?q=" + q.replace(" ", "%20") + "&top=1")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Connection") != "close"
        assert json.loads(r.read())["query"] == q
    finally:
      conn.close()
    with socket.create_connection(httpd.server_address[:2], timeout=30) as s:
      s.sendall(b"GET /static/style.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
      reply = _read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1 404") == 1
    assert reply.index(b"HTTP/1.1 404") > reply.index(b"HTTP/1.1 200")


def test_oversized_headers_refused(colour_index):
  _, out = colour_index
  with _serving(out) as httpd:
    with socket.create_connection(httpd.server_address[:2], timeout=30) as s:
      s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
      try:
        for _ in range(100):   # 100 x 1 KiB, past the 64 KiB limit, never a blank line
          s.sendall(b"X-Big: " + b"a" * 1017 + b"\r\n")
      except OSError:
        pass   # the server closed the connection while we were still sending
      reply = _read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 431")
    assert _get(httpd, "/api/search?q=red&top=1")[0] == 200


def test_index_rebuilt_while_serving(tmp_path):
  """`build_index` replaces the index under a running server: unchanged videos keep their
  thumbnails, the new video is found and served, a deleted one is gone, without a restart."""
  d = str(tmp_path / "videos")
  make_video_folder(d)
  out = str(tmp_path / "index")
  index_lib.build_index(ColourModel(), d, out, progress=False)
  red = index_lib.video_id("red_circle.mp4")
  blue = index_lib.video_id("blue_triangle.mp4")
  with _serving(out) as httpd:
    status, body = _get(httpd, f"/thumb/{red}")
    assert status == 200 and body[:3] == b"\xff\xd8\xff"
    status, body = _get(httpd, "/api/search?q=purple&top=10")
    assert status == 200 and json.loads(body)["indexed"] == 4
    old_version = httpd.searcher.index.version_dir

    write_clip(os.path.join(d, "purple_circle.mp4"), "circle", "purple", "pink", "right")
    os.remove(os.path.join(d, "blue_triangle.mp4"))
    index_lib.build_index(ColourModel(), d, out, progress=False)
    assert not os.path.exists(old_version)   # the build removed the version being served
    new = index_lib.video_id("purple_circle.mp4")

    status, body = _get(httpd, f"/thumb/{red}")
    assert status == 200 and body[:3] == b"\xff\xd8\xff", status
    status, body = _get(httpd, "/api/search?q=purple%20pink&top=2")
    data = json.loads(body)
    assert status == 200 and data["indexed"] == 4
    assert data["results"][0]["file"] == "purple_circle.mp4"
    assert data["results"][0]["id"] == new
    status, body = _get(httpd, f"/thumb/{new}")
    assert status == 200 and body[:3] == b"\xff\xd8\xff"
    status, body = _get(httpd, f"/media/{new}")
    with open(os.path.join(d, "purple_circle.mp4"), "rb") as f:
      assert status == 200 and body == f.read()
    status, body = _get(httpd, f"/api/search?video={new}&top=1")
    assert status == 200 and json.loads(body)["results"][0]["id"] == new
    assert _get(httpd, f"/thumb/{blue}")[0] == 404
    assert _get(httpd, f"/api/search?video={blue}")[0] == 404


def test_index_rebuilt_with_another_model_keeps_the_loaded_version(tmp_path, capsys):
  """A rebuild by another model cannot be served with this one: the server keeps answering from
  the version it has loaded and says so once on stderr."""
  d = str(tmp_path / "videos")
  make_video_folder(d)
  out = str(tmp_path / "index")
  index_lib.build_index(ColourModel(), d, out, progress=False)
  with _serving(out) as httpd:
    assert _get(httpd, "/api/search?q=red&top=1")[0] == 200
    index_lib.build_index(ColourModel(model_id="other-model"), d, out, progress=False,
                          rebuild=True)
    for _ in range(2):
      status, body = _get(httpd, "/api/search?q=yellow&top=1")
      assert status == 200 and json.loads(body)["results"][0]["file"] == "yellow_diamond.mp4"
  err = capsys.readouterr().err
  assert err.count("still serving the previous version") == 1, err
  assert "other-model" in err
