"""The HTTP server under the service: uvicorn with read deadlines, bounded connections and a tamed allocator.

**Why uvicorn, with one protocol subclass.** What a hospital network throws at the service
is mostly *slow* clients: connections that never finish their request head (a scanner
gateway that hangs, a port scan, slowloris). Checked against the stacks at hand:

* **uvicorn** (0.3x–0.5x) has no deadline on reading a request: ``timeout_keep_alive`` runs
  only *between* requests and is cancelled by the first byte of the next one, and
  ``limit_concurrency`` counts open connections — so 63 half-sent requests made it answer
  503 to everyone, ``/health`` included, with no way out (the bug this module fixes).
  ``h11_max_incomplete_event_size`` bounds the *size* of a head, not its time.
* **hypercorn**'s ``read_timeout`` is per ``read()`` call, so a client trickling a byte
  every few seconds never trips it; its keep-alive timer does bound an unfinished head,
  but nothing bounds a slowly streamed body, and it would be a second server dependency.
* an **ASGI middleware** alone cannot help with heads: the application is not called until
  the head is complete, so a stalled head never reaches it.

So: uvicorn's own h11 protocol (``Config(http=<class>)`` is its documented extension point),
subclassed to add what it lacks — `DeadlineH11Protocol`: the request head must be complete
within ``header_timeout`` seconds and the body within ``body_timeout`` seconds of the head,
or the server answers ``408`` and closes the connection. The application adds the polite
half (`covidcxr.serve.app.RequestDeadlineMiddleware`: a 408 JSON body when the body
deadline passes while it reads). ``limit_concurrency`` then only guards file descriptors
(`ServerLimits.max_connections`), since stalled connections no longer accumulate.

**Memory under sustained load.** glibc gives each thread that allocates its own malloc
arena (up to 8 x cores); large numpy temporaries freed in one arena are rarely returned to
the system, and a long-running server's RSS grows in steps (the issue measured 0.71 ->
2.88 GB over ~1,400 requests; ~1.05 GB with ``MALLOC_ARENA_MAX=2``). `tame_malloc` sets the
equivalent of ``MALLOC_ARENA_MAX=2`` and a fixed mmap threshold through ``mallopt`` at
start (so a large decoded film is mmap-ed and unmapped when freed), and `release_free_memory`
(``malloc_trim``) returns freed heap after large requests. The service also runs its work
on a fixed number of threads (`covidcxr.serve.app.ServeSettings.max_active`), never a pool
that grows with the load.

Example:
    >>> server = build_server(create_app(predictor), "127.0.0.1", 8000, ServerLimits())  # doctest: +SKIP
    >>> server.run()                                                                       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import resource
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DeadlineH11Protocol", "ServerLimits", "build_server", "deadline_protocol", "release_free_memory", "tame_malloc"]

log = logging.getLogger("covidcxr.serve")

# mallopt parameters (glibc malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n"


@dataclass(frozen=True)
class ServerLimits:
    """Deadlines and bounds of the HTTP server.

    Attributes:
        header_timeout: seconds to receive a complete request head (line + headers),
            counted from the connection (or the previous response); then 408 and close.
        body_timeout: seconds to receive the whole body once the head is in. 60 s carries
            the 50 MB upload limit at ~7 Mbit/s.
        keep_alive: seconds an idle keep-alive connection stays open between requests.
        max_connections: open connections (stalled ones included) before new requests get
            503; sized to file descriptors, not to the work (the work is bounded by the
            application's admission control).
        max_header_bytes: the largest request head h11 buffers (larger: 400).
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive: float = 5.0
    max_connections: int = 1000
    max_header_bytes: int = 16 * 1024


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head and on the request body.

    A timer follows the client's side of the h11 state machine: ``IDLE`` (waiting for a
    head) gets ``header_timeout`` seconds, ``SEND_BODY`` gets ``body_timeout`` seconds plus
    a small grace (the application answers 408 itself at ``body_timeout`` when it is the
    one reading); any other state cancels the timer. When a timer fires in the same state,
    the connection gets a bare ``408 Request Timeout`` and is closed.
    """

    header_timeout: float = ServerLimits.header_timeout
    body_timeout: float = ServerLimits.body_timeout
    body_grace: float = 2.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_state: Any = None
        super().connection_made(transport)
        self._follow_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_deadline()

    def _cancel_deadline(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _follow_deadline(self) -> None:
        """(Re)arm the timer when the client's h11 state changed; cancel it when nothing is awaited from the client."""
        state = self.conn.their_state
        if state is self._deadline_state:
            return
        self._cancel_deadline()
        self._deadline_state = state
        if self.transport.is_closing():
            return
        if state is h11.IDLE:
            seconds = self.header_timeout
        elif state is h11.SEND_BODY:
            seconds = self.body_timeout + self.body_grace
        else:
            return
        self._deadline = self.loop.call_later(seconds, self._deadline_passed, state)

    def _deadline_passed(self, state: Any) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state is not state:
            return
        what = "request head" if state is h11.IDLE else "request body"
        log.info("closed a connection that did not send its %s in time", what)
        # Bytes straight to the socket: h11 cannot answer a request it has not parsed.
        # Only when no response of ours is under way on this connection.
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def deadline_protocol(limits: ServerLimits) -> type[DeadlineH11Protocol]:
    """A `DeadlineH11Protocol` class with ``limits``' deadlines (uvicorn instantiates it per connection)."""
    return type(
        "DeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {"header_timeout": float(limits.header_timeout), "body_timeout": float(limits.body_timeout)},
    )


def _raise_file_limit(wanted: int) -> None:
    """Raise the soft open-files limit towards ``wanted`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def build_server(app: Any, host: str, port: int, limits: ServerLimits | None = None, log_level: str = "info") -> Any:
    """A ``uvicorn.Server`` for ``app`` with `DeadlineH11Protocol` and ``limits`` (call ``.run()``).

    Args:
        app: the ASGI application (`covidcxr.serve.app.create_app`).
        host, port: where to listen (port 0: any free port; see ``server.servers``).
        limits: deadlines and bounds (default `ServerLimits()`).
        log_level: uvicorn's log level.
    """
    import uvicorn

    limits = limits or ServerLimits()
    _raise_file_limit(limits.max_connections + 64)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=deadline_protocol(limits),
        log_level=log_level,
        server_header=False,
        timeout_keep_alive=max(1, round(limits.keep_alive)),
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        lifespan="off",
    )
    return uvicorn.Server(config)


@functools.lru_cache(maxsize=1)
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tame_malloc(arenas: int = 2, mmap_threshold: int = 16 << 20) -> bool:
    """Limit glibc's malloc arenas and fix its mmap threshold (``mallopt``); call once at start.

    Args:
        arenas: ``M_ARENA_MAX`` (what ``MALLOC_ARENA_MAX`` sets): fewer arenas, less memory
            stranded per thread.
        mmap_threshold: allocations at least this large (a multi-megapixel film, its float
            copies) are served by ``mmap`` and given back to the system when freed. Setting it
            also stops glibc from raising the threshold dynamically after such frees. 16 MB
            keeps the networks' activations (a few MB each, allocated and freed on every
            request) on the reused heap: at 1 MB each request page-faulted ~6,000 fresh pages
            in (2.8x the minor faults, a few ms per prediction).

    Returns:
        False where this is not glibc (musl, macOS): nothing was changed.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, int(arenas)) == 1
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and ok
    return ok


def release_free_memory() -> None:
    """``malloc_trim(0)``: give the heap's free pages back to the system (glibc; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
