"""Search server under stalled connections: threads of `python -m tvr_jax.serve` (from /proc).

    .venv/bin/python -m benchmarks.search_server_stall --index INDEX [--stalled 300] [--hold 20]

Starts the server on a free loopback port, opens `--stalled` connections that send a partial
request (nothing, half a request line, or headers without the closing blank line; a third each)
and then stall, answers one normal text search while they are open, and prints the server's
thread count (`Threads:` of /proc/PID/status) before, with the connections open, and `--hold`
seconds later, plus how many stalled connections the server still holds and the search latency.
The server is the one `PYTHONPATH` selects, so the same script measures any version of it.
INDEX: any index with a recorded checkpoint (`python -m tvr_jax.index`). Linux only (/proc).
"""

import argparse
import http.client
import os
import re
import select
import socket
import subprocess
import sys
import time

PARTIAL = (b"", b"GET /api/sea", b"GET /api/search?q=red HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: 1")


def threads(pid: int) -> int:
  """Threads of process `pid` (Linux /proc)."""
  with open(f"/proc/{pid}/status") as f:
    return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))


def search(port: int, query: str = "red") -> tuple[int, float]:
  """(HTTP status, seconds) of one text search."""
  t0 = time.perf_counter()
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  try:
    conn.request("GET", "/api/search?q=" + query + "&top=2")
    r = conn.getresponse()
    r.read()
    return r.status, time.perf_counter() - t0
  finally:
    conn.close()


def still_open(sock: socket.socket) -> bool:
  """True while the server has neither closed the connection nor answered on it."""
  sock.setblocking(False)
  try:
    sock.recv(1, socket.MSG_PEEK)
    return False
  except BlockingIOError:
    return True
  except OSError:
    return False


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--index", required=True)
  p.add_argument("--stalled", type=int, default=300)
  p.add_argument("--hold", type=float, default=20.0)
  p.add_argument("--startup_timeout", type=float, default=300.0)
  args = p.parse_args()
  proc = subprocess.Popen([sys.executable, "-m", "tvr_jax.serve", "--index", args.index,
                           "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  socks = []
  try:
    deadline = time.monotonic() + args.startup_timeout
    port = None
    while port is None and time.monotonic() < deadline and proc.poll() is None:
      if select.select([proc.stdout], [], [], 1.0)[0]:
        m = re.search(r"http://[^:]+:(\d+)/", proc.stdout.readline())
        port = int(m.group(1)) if m else None
    if port is None:
      sys.exit(f"server did not start within {args.startup_timeout:.0f} s (rc {proc.poll()})")
    status, warm = search(port)   # compiles the query path once
    before = threads(proc.pid)
    for i in range(args.stalled):
      s = socket.create_connection(("127.0.0.1", port), timeout=60)
      socks.append(s)
      if PARTIAL[i % 3]:
        s.sendall(PARTIAL[i % 3])
    status, latency = search(port, "a%20blue%20thing")
    during = threads(proc.pid)
    open_during = sum(still_open(s) for s in socks)
    time.sleep(args.hold)
    after = threads(proc.pid)
    open_after = sum(still_open(s) for s in socks)
  finally:
    for s in socks:
      s.close()
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
  code = os.environ.get("PYTHONPATH", "(installed)")
  print(f"server code: PYTHONPATH={code}; {args.stalled} stalled connections")
  print(f"{'':34s} threads  stalled connections still open")
  print(f"{'before (after one warm-up search)':34s} {before:7d}")
  print(f"{'stalled open, after a search':34s} {during:7d}  {open_during}")
  print(f"{f'{args.hold:g} s later':34s} {after:7d}  {open_after}")
  print(f"search while stalled: HTTP {status} in {latency * 1e3:.1f} ms "
        f"(warm-up search {warm * 1e3:.0f} ms)")


if __name__ == "__main__":
  main()
