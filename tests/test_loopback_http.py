"""bench/loopback_http.py, the load client, against raw servers on 127.0.0.1 that answer in each framing it
reads (Content-Length, chunked, close-delimited), close keep-alive connections, or send garbage. Bounded:
a few exchanges, each server a thread that serves a fixed script and stops."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest

from bench import loopback_http as lh


def scripted_server(answers: list, close_after: set = frozenset()):
  """A thread serving one connection at a time on 127.0.0.1: for the k-th request (any connection) it sends
  answers[k] and closes the connection when k is in close_after; it stops after len(answers) requests.
  Returns (port, requests seen: list of raw request heads+bodies, thread)."""
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(8)
  listener.settimeout(10)
  seen: list = []

  def read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
      chunk = conn.recv(65536)
      if not chunk:
        return b""
      data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
      body += conn.recv(65536)
    return head + b"\r\n\r\n" + body

  def serve():
    k = 0
    try:
      while k < len(answers):
        conn, _ = listener.accept()
        conn.settimeout(10)
        with conn:
          while k < len(answers):
            request = read_request(conn)
            if not request:
              break
            seen.append(request)
            conn.sendall(answers[k])
            k += 1
            if k - 1 in close_after:
              break
    except OSError:
      pass
    finally:
      listener.close()

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  return listener.getsockname()[1], seen, thread


def test_reads_every_framing_and_reuses_the_connection():
  answers = [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
             b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
             b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\r\nbye"]
  port, seen, thread = scripted_server(answers, close_after={3})

  async def go():
    async with lh.LoopbackClient("127.0.0.1", port, 4) as client:
      out = [await client.request("POST", "/predict", b'{"texts": ["a"]}'),
             await client.request("GET", "/health"),
             await client.request("POST", "/predict", b"")]
      out.append(await client.request("GET", "/metrics"))
      return out, client.opened

  out, opened = lh.run(go())
  assert out == [(200, b"hello"), (429, b"abcde"), (200, b""), (503, b"bye")]
  assert opened == 1                                  # keep-alive: one connection for all four
  assert seen[0].startswith(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:")
  assert b"Content-Length: 16\r\n" in seen[0] and seen[0].endswith(b'{"texts": ["a"]}')
  assert seen[1].startswith(b"GET /health HTTP/1.1\r\n") and b"Content-Length" not in seen[1]
  thread.join(5)


def test_a_pooled_connection_closed_by_the_server_is_retried_once_on_a_fresh_one():
  port, seen, thread = scripted_server([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 2, close_after={0})

  async def go():
    async with lh.LoopbackClient("127.0.0.1", port, 2) as client:
      first = await client.request("GET", "/a")
      await asyncio.sleep(0.05)                       # the server has closed it by now (keep-alive timeout)
      return first, await client.request("GET", "/b"), client.opened

  assert lh.run(go()) == ((200, b"ok"), (200, b"ok"), 2)
  assert [r.split(b" ")[1] for r in seen] == [b"/a", b"/b"]
  thread.join(5)


def test_bodiless_statuses_http10_and_an_answer_cut_after_its_head():
  answers = [b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",      # no body, whatever it says
             b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",           # HTTP/1.0: not reused
             b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]       # then the server closes
  port, seen, thread = scripted_server(answers, close_after={1, 2})

  async def go():
    async with lh.LoopbackClient("127.0.0.1", port, 1) as client:
      out = [await client.request("GET", "/a"), await client.request("GET", "/b")]
      with pytest.raises(asyncio.IncompleteReadError):   # an answer had begun: never sent again
        await client.request("POST", "/c", b"x")
      return out, client.opened

  out, opened = lh.run(go())
  assert out == [(204, b""), (200, b"ok")] and opened == 2 and len(seen) == 3
  thread.join(5)


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", "longer than 64 KiB")])
def test_malformed_answers_are_protocol_errors(answer, message):
  port, _, thread = scripted_server([answer], close_after={0})
  with pytest.raises(lh.ProtocolError, match=message):
    lh.run(lh.LoopbackClient("127.0.0.1", port).request("GET", "/"))
  thread.join(5)


def test_garbage_refused_and_cancelled_exchanges_fail_without_poisoning_the_pool():
  port, _, thread = scripted_server([b"SSH-2.0-OpenSSH\r\n\r\n"])
  with pytest.raises(lh.ProtocolError, match="not an HTTP/1.x status line"):
    lh.run(lh.LoopbackClient("127.0.0.1", port).request("GET", "/"))
  thread.join(5)

  with socket.socket() as s:                          # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    free = s.getsockname()[1]
  with pytest.raises(OSError):
    lh.get("127.0.0.1", free, "/health")

  silent = socket.socket()                            # accepts, never answers: the caller's timeout cancels
  silent.bind(("127.0.0.1", 0))
  silent.listen(1)

  async def go():
    client = lh.LoopbackClient("127.0.0.1", silent.getsockname()[1], 1)
    with pytest.raises(asyncio.TimeoutError):
      await asyncio.wait_for(client.request("GET", "/"), 0.2)
    idle = len(client._idle)
    await client.aclose()
    return idle

  try:
    assert lh.run(go()) == 0                          # the cancelled connection is closed, not pooled
  finally:
    silent.close()


def test_only_loopback_addresses():
  for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
    lh.check_loopback(host)
  assert lh.LoopbackClient("::1", 8080)._request_bytes("GET", "/", b"", None).startswith(
      b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n")
  for host in ("10.0.0.1", "0.0.0.0", "example.com", "192.168.1.2"):
    with pytest.raises(ValueError, match="not a loopback address"):
      lh.LoopbackClient(host, 80)
