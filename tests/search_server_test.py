"""The search page and API: JSON search, Range requests, refusal of traversal / unknown ids /
foreign Host headers, security headers, and the page driven in headless Chromium (results,
screenshot under test-artifacts/, an HTML-injection query rendered as text)."""

import http.client
import json
import os
import threading

import pytest

from conftest import REPO_ROOT
from search_fixtures import ColourModel, make_video_folder
from tvr_jax.video_search import index as index_lib
from tvr_jax.video_search import retrieve, server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = os.path.join(REPO_ROOT, "test-artifacts")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  d = str(root / "videos")
  make_video_folder(d)
  out = str(root / "index")
  index_lib.build_index(ColourModel(), d, out, progress=False)
  searcher = retrieve.Searcher(index_lib.SearchIndex.load(out), ColourModel(), shortlist=4)
  httpd = server.make_server(searcher, "127.0.0.1", 0, verbose=False)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd, searcher, d
  httpd.shutdown()
  httpd.server_close()


def _get(httpd, path, headers=None):
  """Raw GET (the path is sent exactly as given, no client-side normalisation)."""
  conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=30)
  conn.request("GET", path, headers=headers or {})
  r = conn.getresponse()
  body = r.read()
  conn.close()
  return r, body


def test_api_search_and_headers(served):
  httpd, searcher, _ = served
  r, body = _get(httpd, "/api/search?q=a%20blue%20thing&top=2")
  assert r.status == 200
  data = json.loads(body)
  assert data["results"][0]["file"] == "blue_triangle.mp4" and len(data["results"]) == 2
  first = data["results"][0]
  assert first["media"] == f"/media/{first['id']}" and first["thumb"] == f"/thumb/{first['id']}"
  assert "script-src 'self'" in r.getheader("Content-Security-Policy")
  assert "default-src 'none'" in r.getheader("Content-Security-Policy")
  assert r.getheader("X-Content-Type-Options") == "nosniff"
  r, body = _get(httpd, f"/api/search?video={first['id']}&top=1")
  assert r.status == 200 and json.loads(body)["results"][0]["id"] == first["id"]
  r, _ = _get(httpd, "/api/search?q=")
  assert r.status == 400
  r, _ = _get(httpd, "/api/search?q=red&top=x")
  assert r.status == 400
  r, body = _get(httpd, "/")
  assert r.status == 200 and b'<script src="/static/app.js"' in body
  r, body = _get(httpd, f"/thumb/{first['id']}")
  assert r.status == 200 and body[:3] == b"\xff\xd8\xff"


def test_media_range_requests(served):
  httpd, searcher, d = served
  vid = index_lib.video_id("red_circle.mp4")
  with open(os.path.join(d, "red_circle.mp4"), "rb") as f:
    data = f.read()
  r, body = _get(httpd, f"/media/{vid}")
  assert r.status == 200 and body == data and r.getheader("Accept-Ranges") == "bytes"
  assert r.getheader("Content-Type") == "video/mp4"
  r, body = _get(httpd, f"/media/{vid}", {"Range": "bytes=10-99"})
  assert r.status == 206 and body == data[10:100]
  assert r.getheader("Content-Range") == f"bytes 10-99/{len(data)}"
  r, body = _get(httpd, f"/media/{vid}", {"Range": "bytes=100-"})
  assert r.status == 206 and body == data[100:]
  r, body = _get(httpd, f"/media/{vid}", {"Range": "bytes=-50"})
  assert r.status == 206 and body == data[-50:]
  r, _ = _get(httpd, f"/media/{vid}", {"Range": f"bytes={len(data)}-"})
  assert r.status == 416 and r.getheader("Content-Range") == f"bytes */{len(data)}"
  r, _ = _get(httpd, f"/media/{vid}", {"Range": "bytes=abc"})
  assert r.status == 416


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/media/..%2f..%2fetc%2fpasswd", "/media/../../etc/passwd",
    "/media/%2e%2e/%2e%2e/etc/passwd", "/media/0000000000000000", "/thumb/0000000000000000",
    "/media/", "/thumb/../index.json", "/static/../server.py", "/static/app.js/../../server.py",
    "/media//etc/passwd", "/api/../../etc/passwd", "/index.json", "/CURRENT",
])
def test_traversal_and_unknown_ids_refused(served, path):
  httpd, _, _ = served
  r, body = _get(httpd, path)
  assert r.status == 404, (path, r.status)
  assert b"root:" not in body and b"import" not in body


def test_api_video_takes_ids_not_paths(served):
  httpd, _, d = served
  r, _ = _get(httpd, "/api/search?video=" + os.path.join(d, "red_circle.mp4"))
  assert r.status == 404
  r, _ = _get(httpd, "/api/search?video=/etc/passwd")
  assert r.status == 404


def test_foreign_host_header_refused(served):
  httpd, _, _ = served
  r, _ = _get(httpd, "/api/search?q=red", {"Host": "evil.example:8000"})
  assert r.status == 403
  r, _ = _get(httpd, "/api/search?q=red", {"Host": "localhost"})
  assert r.status == 200


def test_default_bind_is_loopback():
  import inspect
  from tvr_jax import serve
  assert inspect.signature(server.make_server).parameters["host"].default == "127.0.0.1"
  assert "default=\"127.0.0.1\"" in inspect.getsource(serve.main)


def _browser():
  """(sync_playwright context manager) or a skip / failure saying how to install what is missing."""
  missing = []
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    missing.append("the Python package playwright (pip install playwright; never run "
                   "`playwright install`)")
    sync_playwright = None
  if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    missing.append(f"Chromium at {CHROMIUM} (apt-get update && apt-get install -y chromium)")
  if missing:
    message = "headless browser test needs " + " and ".join(missing)
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  return sync_playwright


def test_page_in_headless_chromium(served):
  sync_playwright = _browser()
  httpd, _, _ = served
  host, port = httpd.server_address[:2]
  url = f"http://{host}:{port}/"
  os.makedirs(ARTIFACTS, exist_ok=True)
  console_errors = []
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
      page = browser.new_page(viewport={"width": 1100, "height": 800})
      page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
      page.goto(url)
      page.fill("#q", "a yellow shape")
      page.click("#go")
      page.wait_for_selector("article.card")
      names = page.locator("article.card .name").all_text_contents()
      assert names[0] == "yellow_diamond.mp4" and len(names) == 4
      assert page.locator("article.card video").first.get_attribute("src").startswith("/media/")
      assert "for “a yellow shape”" in page.text_content("#status")
      page.screenshot(path=os.path.join(ARTIFACTS, "search_page.png"), full_page=True)
      # The player loads the clip and seeks (the server answers Range requests).
      played = page.evaluate("""async () => {
        const v = document.querySelector('article.card video');
        const once = (name) => new Promise((ok, fail) => {
          v.addEventListener(name, ok, {once: true});
          v.addEventListener('error', () => fail(new Error('media error ' + v.error.code)),
                             {once: true});
          setTimeout(() => fail(new Error('timeout waiting for ' + name)), 10000);
        });
        v.preload = 'auto'; v.load(); await once('loadedmetadata');
        v.currentTime = 2.0; await once('seeked');
        return [v.duration, v.currentTime];
      }""")
      assert abs(played[0] - 3.0) < 0.3 and abs(played[1] - 2.0) < 0.3, played

      # "similar videos" on the first card: a video query; the video itself ranks first.
      page.locator("article.card button.similar").first.click()
      # (Locator waits, not wait_for_function: the page's CSP forbids the eval that needs.)
      page.locator("#status", has_text="videos like").wait_for()
      assert page.locator("article.card .name").first.text_content() == "yellow_diamond.mp4"

      # HTML injection: shown literally, no element created, no script run.
      attack = '<img src=x onerror="window.__pwned=1"><b id="injected">bold</b>'
      page.fill("#q", attack)
      page.click("#go")
      page.locator("#status", has_text="<img src=x").wait_for()
      assert attack in page.text_content("#status")
      assert page.evaluate("document.querySelectorAll('img').length") == 0
      assert page.evaluate("document.getElementById('injected')") is None
      assert page.evaluate("typeof window.__pwned") == "undefined"
      page.screenshot(path=os.path.join(ARTIFACTS, "search_page_injection.png"))
    finally:
      browser.close()
  assert os.path.getsize(os.path.join(ARTIFACTS, "search_page.png")) > 1000
  assert not [e for e in console_errors if "Content Security Policy" in e], console_errors
