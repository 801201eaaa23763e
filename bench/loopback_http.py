"""A lean asyncio HTTP/1.1 client for load generation on loopback: keep-alive connections, bytes in, bytes out.

Why not httpx: a load generator must cost far less than the server it measures, since on 2 cores the two
share the CPU. Against a Starlette app that answers a fixed JSON body (uvicorn, httptools, uvloop; AMD EPYC,
2 cores), httpx's AsyncClient reached 318 requests/s at 16 in flight and 146 at 128; this client reached
7,468 and 6,139 (`tests/test_loopback_http.py` checks the protocol, not the speed). With httpx the bench's
saturation phase measured the client: the early-exit server sat mostly idle.

What it speaks: a request line, Host, Content-Type and Content-Length; answers with Content-Length, chunked
transfer encoding, or a body up to the connection's close (none for 1xx, 204, 304); `Connection: close` (and
HTTP/1.0 without keep-alive) is honoured. A connection that was idle in the pool and turns out closed by the
server (keep-alive timeout) before an answer began is retried once on a fresh one, as httpx does; a
malformed answer (bad status line, negative or unreadable lengths, a head over 64 KiB) is a ProtocolError.
A cancelled or failed exchange closes its connection (its state is unknown), so the pool only ever holds
connections between two complete exchanges.

Only loopback addresses are accepted: the bench must never reach another host.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Optional

LOOPBACK_NAMES = ("localhost",)


class ProtocolError(OSError):
  """The server's answer is not HTTP/1.1 this client can read (an OSError: callers count it as failed)."""


def check_loopback(host: str) -> None:
  """Raises ValueError unless host is a loopback address (127.0.0.0/8, ::1) or 'localhost'."""
  if host in LOOPBACK_NAMES:
    return
  try:
    if ipaddress.ip_address(host).is_loopback:
      return
  except ValueError:
    pass
  raise ValueError(f"{host!r} is not a loopback address: the load client only talks to 127.0.0.1 / ::1")


def _length(raw: bytes, what: str, base: int = 10) -> int:
  try:
    value = int(raw.split(b";", 1)[0].strip(), base)
  except ValueError:
    value = -1
  if value < 0:
    raise ProtocolError(f"bad {what} {raw[:40]!r}")
  return value


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict, http10: bool) -> tuple[bytes, bool]:
  """The body of an answer and whether the connection may be reused."""
  tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
  keep = b"keep-alive" in tokens if http10 else b"close" not in tokens
  if status < 200 or status in (204, 304):   # no body, whatever the headers say
    return b"", keep
  if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
    parts = []
    while True:
      size = _length(await reader.readuntil(b"\r\n"), "chunk size line", 16)
      if size == 0:
        while (await reader.readuntil(b"\r\n")) != b"\r\n":   # trailers, then the blank line
          pass
        return b"".join(parts), keep
      parts.append(await reader.readexactly(size))
      await reader.readexactly(2)
  if b"content-length" in headers:
    return await reader.readexactly(_length(headers[b"content-length"], "Content-Length")), keep
  return await reader.read(), False   # delimited by the close


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, started: list
                    ) -> tuple[int, bytes, bool]:
  """Writes one request, reads its answer: (status, body, reusable). Sets started[0] once the head came."""
  writer.write(request)
  try:
    head = await reader.readuntil(b"\r\n\r\n")
  except asyncio.LimitOverrunError:
    raise ProtocolError("the answer's head is longer than 64 KiB") from None
  started[0] = True
  lines = head[:-4].split(b"\r\n")
  parts = lines[0].split(b" ", 2)
  if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
    raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
  headers = {}
  for line in lines[1:]:
    name, _, value = line.partition(b":")
    headers[name.strip().lower()] = value.strip()
  status = int(parts[1])
  try:
    body, keep = await _read_body(reader, status, headers, parts[0] == b"HTTP/1.0")
  except asyncio.LimitOverrunError:
    raise ProtocolError("a chunk line is longer than 64 KiB") from None
  return status, body, keep


class LoopbackClient:
  """Up to `max_connections` keep-alive connections to one loopback host:port; `async with` closes them.

    async with LoopbackClient("127.0.0.1", port, 64) as client:
      status, body = await client.request("POST", "/predict", b'{"texts": ["..."]}')
  """

  def __init__(self, host: str, port: int, max_connections: int = 64):
    check_loopback(host)
    if max_connections < 1:
      raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    self.host, self.port = host, int(port)
    self._idle: list = []   # (reader, writer) between two complete exchanges
    self._slots = asyncio.Semaphore(max_connections)
    self.opened = 0         # connections opened (tests: keep-alive reuses them)
    self._closed = False

  async def __aenter__(self) -> "LoopbackClient":
    return self

  async def __aexit__(self, *exc) -> None:
    await self.aclose()

  async def aclose(self) -> None:
    self._closed = True     # an exchange still running closes its connection instead of pooling it
    idle, self._idle = self._idle, []
    for _, writer in idle:
      writer.close()
    for _, writer in idle:
      try:
        await writer.wait_closed()
      except OSError:
        pass

  def _request_bytes(self, method: str, path: str, body: bytes, content_type: Optional[str]) -> bytes:
    host = f"[{self.host}]" if ":" in self.host else self.host
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
    if body or method in ("POST", "PUT"):
      head += f"Content-Type: {content_type or 'application/json'}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body

  async def request(self, method: str, path: str, body: bytes = b"",
                    content_type: Optional[str] = None) -> tuple[int, bytes]:
    """(status, body) of one exchange. Raises OSError (refused, reset, ProtocolError) or
    asyncio.IncompleteReadError (an EOFError) when no complete answer came; cancellation is safe."""
    request = self._request_bytes(method, path, body, content_type)
    async with self._slots:
      fresh = False
      while True:
        reused = bool(self._idle) and not fresh
        reader, writer = self._idle.pop() if reused else await self._open()
        keep, started = False, [False]
        try:
          status, data, keep = await _exchange(reader, writer, request, started)
          return status, data
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
          # A pooled connection the server closed while it was idle: no answer began, so the request was
          # not taken; once more, on a fresh connection. Anything else is the caller's failure.
          if not reused or started[0]:
            raise
          fresh = True
        finally:
          if keep and not self._closed:
            self._idle.append((reader, writer))
          else:
            writer.close()

  async def _open(self):
    self.opened += 1
    return await asyncio.open_connection(self.host, self.port)


def new_event_loop() -> asyncio.AbstractEventLoop:
  """uvloop's loop when installed (the server's too; cheaper per request), else asyncio's."""
  try:
    import uvloop
    return uvloop.new_event_loop()
  except ImportError:
    return asyncio.new_event_loop()


def run(coroutine):
  """asyncio.run on `new_event_loop()`'s loop."""
  loop = new_event_loop()
  try:
    return loop.run_until_complete(coroutine)
  finally:
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
  """One blocking GET (a readiness probe): (status, body); OSError / EOFError / TimeoutError when none came."""
  async def once():
    async with LoopbackClient(host, port, 1) as client:
      return await asyncio.wait_for(client.request("GET", path), timeout)
  return run(once())
