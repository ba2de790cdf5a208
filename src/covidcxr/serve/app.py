"""The inference service: FastAPI app, upload safety, and the web page.

Routes:

* ``GET /`` — a plain page (HTML + a little vanilla JavaScript, served from this package,
  nothing from the network) to upload an image and see the result beside the overlays
  and warnings;
* ``POST /predict`` — multipart upload in the field ``file`` (PNG, JPEG, TIFF, BMP or
  DICOM, told apart by content); query ``gradcam=true|false`` (default: the service's
  setting). Returns the `covidcxr.serve.predictor.Prediction` as JSON, overlays as
  ``data:image/png;base64`` URIs;
* ``GET /model`` — the model card (`covidcxr.serve.model_card`), with ``summary`` in words
  (what it was trained on, seen/unseen metrics with intervals, audit verdict, operating
  point, what it must not be used for) and ``abstention`` (its rules, and whether every
  prediction abstains);
* ``GET /health`` — liveness and what is being served.

Safety, for any upload:

* the request body is limited **before** it is read: a ``Content-Length`` over the limit
  gets 413 at once, and a body streamed without one is counted and cut off
  (`UploadLimitMiddleware`); at most one file part is parsed;
* the format comes from the bytes (`covidcxr.io.sniff`), never from the name or the
  declared content type; the pixel count in the header is checked before decoding
  (decompression-bomb guard, 413);
* the client's file name is never used, logged or echoed: the bytes go to a private
  temporary file named by the service (`Predictor.predict_bytes`);
* DICOM: only pixel-related elements and the view are read (`covidcxr.io.dicom`), so
  names, ids and dates can reach neither the logs nor the response;
* optional bearer token (``token``): ``/predict``, ``/model`` and ``/openapi.json`` then
  need ``Authorization: Bearer <token>`` (compared in constant time); ``/`` and ``/health``
  stay open so the page can load and ask for it; there are no Swagger/ReDoc pages (they
  load JavaScript from a CDN);
* deadlines: a body not received within ``body_timeout`` seconds is a 408
  (`RequestDeadlineMiddleware`; the request head's deadline is the server's,
  `covidcxr.serve.server`);
* admission control (`Admission`): at most ``max_active`` predictions run at once (on as
  many threads, a fixed pool) and at most ``max_pixels_in_flight`` decoded pixels (from
  the headers, before decoding); up to ``max_queue`` more wait at most ``queue_timeout``
  seconds; beyond that, 503 with ``Retry-After``. ``/health`` never waits for any of it;
* no server path in any response: error details, the model card and predictions pass
  through `redact_paths` (the temporary folder, the run folder, the home and working
  folders, any absolute path);
* every bad input is a 4xx JSON body ``{"error": code, "detail": message}`` — 400
  missing/empty file or malformed request, 401 token, 413 too large, 415 not an image,
  422 unreadable or not a chest radiograph; an unexpected failure is a 500 with no
  internals in the body (the traceback goes to the log).

Example:
    >>> app = create_app(Predictor.load("runs/demo"), ServeSettings(token="s3cret"))   # doctest: +SKIP
    >>> build_server(app, "127.0.0.1", 8000).run()   # covidcxr.serve.server: deadlines   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from covidcxr import MEDICAL_USE_BANNER, __version__
from covidcxr.errors import CovidCXRError, ImageReadError
from covidcxr.serve.server import release_free_memory
from covidcxr.serve.errors import (
    EmptyUpload,
    MissingUpload,
    RequestTimeout,
    ServeError,
    ServiceBusy,
    Unauthorized,
    UploadTooLarge,
)

__all__ = [
    "Admission",
    "RequestDeadlineMiddleware",
    "ServeSettings",
    "ServiceBusy",
    "UploadLimitMiddleware",
    "create_app",
    "declared_pixels",
    "redact_paths",
    "STATIC_DIR",
]

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Room for the multipart boundary and part headers on top of the file's own bytes.
MULTIPART_OVERHEAD = 64 * 1024
log = logging.getLogger("covidcxr.serve")

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "upload_too_large", 415: "unsupported_media_type", 422: "unprocessable", 503: "busy"}
#: Pixels above which a finished request gives freed heap back to the system (`release_free_memory`).
TRIM_AFTER_PIXELS = 4_000_000
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
]


@dataclass(frozen=True)
class ServeSettings:
    """How the service treats requests.

    Attributes:
        max_upload_bytes: largest accepted file (the request body may be
            `MULTIPART_OVERHEAD` larger). 50 MB holds an uncompressed 16-bit 4k x 4k DICOM.
        token: bearer token required on ``/predict``, ``/model`` and ``/openapi.json``; None = open.
        gradcam: compute Grad-CAM unless the request says ``gradcam=false``.
        body_timeout: seconds to receive a request body once its head is in (408 after).
        max_active: predictions running at once (each on one of as many worker threads;
            the network itself runs one at a time, screening and decoding overlap).
        max_queue: predictions waiting for a slot beyond ``max_active``; more get 503.
        max_pixels_in_flight: decoded pixels (from the image headers) of the running
            predictions together; one image larger than this still runs, alone.
        queue_timeout: seconds a request waits for a slot before 503.
        retry_after: the ``Retry-After`` seconds of a 503.
    """

    max_upload_bytes: int = 50 * 1024 * 1024
    token: str | None = None
    gradcam: bool = True
    body_timeout: float = 60.0
    max_active: int = 2
    max_queue: int = 32
    max_pixels_in_flight: int = 80_000_000
    queue_timeout: float = 30.0
    retry_after: int = 2




# ------------------------------------------------------------------ no server paths in responses


def _path_roots(extra: Iterable[str | Path] = ()) -> list[str]:
    roots = {tempfile.gettempdir(), str(Path.home()), os.getcwd(), sys.prefix, str(Path(__file__).resolve().parents[2])}
    roots.update(str(p) for p in extra if p)
    resolved = set()
    for root in roots:
        resolved.add(str(root).rstrip("/"))
        try:
            resolved.add(str(Path(root).resolve()).rstrip("/"))
        except OSError:
            pass
    return sorted((r for r in resolved if len(r) > 1), key=len, reverse=True)


# An absolute POSIX path of at least two components, not inside a word, a URL or a ratio ("1/3", "left/right").
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:~|/[^\s/'\"()<>,;]+)(?:/[^\s/'\"()<>,;]*)+")


def redact_paths(value: Any, roots: Iterable[str] = ()) -> Any:
    """``value`` (a string, or lists/dicts of them) with every server path replaced.

    A string that *is* a path becomes its last component (``"/data/cxr"`` -> ``"cxr"``);
    a path inside a sentence becomes ``<server path>``. ``data:`` URIs (the overlays) are
    left alone.

    Example:
        >>> redact_paths("cannot identify image file '/tmp/covidcxr-upload-x1/upload'")
        "cannot identify image file '<server path>'"
        >>> redact_paths({"collection": "/work/shared/data/cxr", "ratio": "outside 1/3-3"})
        {'collection': 'cxr', 'ratio': 'outside 1/3-3'}
    """
    if isinstance(value, dict):
        return {k: redact_paths(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_paths(v, roots) for v in value]
    if not isinstance(value, str) or value.startswith("data:"):
        return value
    text = value.strip()
    if (text.startswith(("/", "~/", "../", "./")) or re.match(r"^[A-Za-z]:[\\/]", text)) and not any(c.isspace() for c in text):
        return Path(text.replace("\\", "/")).name or "<server path>"
    for root in roots:
        if root in value:
            value = re.sub(re.escape(root) + r"[^\s'\"()<>,;]*", "<server path>", value)
    return _ABSOLUTE_PATH.sub("<server path>", value)


def _json_error(status: int, code: str, detail: str, headers: dict[str, str] | None = None, roots: Iterable[str] = ()) -> JSONResponse:
    return JSONResponse({"error": code, "detail": redact_paths(str(detail), roots)}, status_code=status, headers=headers)


# ------------------------------------------------------------------ admission control


def declared_pixels(data: bytes) -> int | None:
    """The pixel count an image's header declares, without decoding it (None: not told).

    PNG/JPEG/TIFF/BMP through Pillow's lazy ``Image.open`` (header only); DICOM through
    pydicom reading only *Rows*, *Columns* and *Number of Frames*.
    """
    from covidcxr.io.sniff import sniff_format

    image_format = sniff_format(data[:4096])
    try:
        if image_format == "dicom":
            import pydicom

            from covidcxr.io.sniff import has_dicom_preamble

            dataset = pydicom.dcmread(
                io.BytesIO(data), force=not has_dicom_preamble(data[:132]), stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"]
            )
            return int(dataset.Rows) * int(dataset.Columns) * int(getattr(dataset, "NumberOfFrames", 1) or 1)
        if image_format is not None:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            return int(width) * int(height)
    except Exception:  # noqa: BLE001 - the predictor's screening names what is wrong
        return None
    return None


class Admission:
    """A bound on predictions running at once, on their decoded pixels, and on the queue before them.

    `enter` waits (at most ``queue_timeout``) until fewer than ``max_active`` predictions
    run and the image's pixels fit in what is left of ``max_pixels_in_flight``; an image
    larger than the whole budget runs alone. A request arriving with ``max_queue``
    already waiting, or waiting too long, gets `ServiceBusy` (503 + ``Retry-After``).
    Lives on the event loop (asyncio, no locks held across threads).
    """

    def __init__(self, max_active: int, max_queue: int, max_pixels_in_flight: int, queue_timeout: float):
        if max_active < 1 or max_queue < 0 or max_pixels_in_flight < 1:
            raise CovidCXRError(f"admission limits must be positive: max_active={max_active}, max_queue={max_queue}, max_pixels_in_flight={max_pixels_in_flight}")
        self.max_active, self.max_queue = int(max_active), int(max_queue)
        self.max_pixels, self.queue_timeout = int(max_pixels_in_flight), float(queue_timeout)
        self.active = 0
        self.pixels = 0
        self.waiting = 0
        self.refused = 0
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created on the serving loop, not at import or in tests' threads
            self._changed = asyncio.Condition()
        return self._changed

    def check_queue(self) -> None:
        """Refuse at once (before the body is read) when the queue is already full."""
        if self.active + self.waiting >= self.max_active + self.max_queue:
            self.refused += 1
            raise ServiceBusy(f"the service is busy ({self.active} predictions running, {self.waiting} waiting); try again shortly")

    def _fits(self, pixels: int) -> bool:
        return self.active < self.max_active and (self.active == 0 or self.pixels + pixels <= self.max_pixels)

    async def enter(self, pixels: int) -> None:
        """Wait for a slot and room for ``pixels``; raises `ServiceBusy` when the queue is full or the wait too long."""
        self.check_queue()
        changed = self._condition()
        self.waiting += 1  # counted at once: requests arriving together see each other
        try:
            async with changed:
                await asyncio.wait_for(changed.wait_for(lambda: self._fits(pixels)), self.queue_timeout)
                self.active += 1
                self.pixels += pixels
        except asyncio.TimeoutError:
            self.refused += 1
            raise ServiceBusy(
                f"the service is busy: no prediction slot freed within {self.queue_timeout:g} s ({self.active} running); try again shortly"
            ) from None
        finally:
            self.waiting -= 1

    async def leave(self, pixels: int) -> None:
        changed = self._condition()
        async with changed:
            self.active -= 1
            self.pixels -= pixels
            changed.notify_all()

    def snapshot(self) -> dict[str, int]:
        return {"active": self.active, "waiting": self.waiting, "pixels_in_flight": self.pixels, "refused": self.refused}


class UploadLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` before reading them (pure ASGI).

    A declared ``Content-Length`` over the limit is answered 413 without reading a byte;
    a body without one (chunked) is counted as it streams in and cut off with
    `UploadTooLarge` (413) as soon as it passes the limit.
    """

    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _json_error(400, "bad_request", "Content-Length is not a number")(scope, receive, send)
                return
            if length > self.max_body_bytes:
                response = _json_error(413, UploadTooLarge.code, f"the request body is {length} bytes, over the {self.max_body_bytes}-byte limit")
                await response(scope, receive, send)
                return
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(f"the request body passed the {limit}-byte limit; refused while streaming")
            return message

        await self.app(scope, limited_receive, send)


class RequestDeadlineMiddleware:
    """A request body must arrive within ``body_timeout`` seconds, or the request gets 408 (pure ASGI).

    Each ``receive()`` of a body message waits at most what is left of the deadline; when it
    passes, `RequestTimeout` is raised inside the route (a 408 JSON body, and the
    connection closed). The server closes connections whose body stalls where the
    application is not reading (`covidcxr.serve.server.DeadlineH11Protocol`).
    """

    def __init__(self, app: Any, body_timeout: float):
        self.app = app
        self.body_timeout = float(body_timeout)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout
        complete = False

        async def timed_receive() -> dict:
            nonlocal complete
            if complete:
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout:g} s") from None
            if message.get("type") != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)


class SecurityHeadersMiddleware:
    """Add no-sniff, no-frame, no-referrer, no-store and a strict Content-Security-Policy to every response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [(k, v) for k, v in _SECURITY_HEADERS if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(predictor: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``predictor`` (a `covidcxr.serve.predictor.Predictor`).

    Args:
        predictor: loaded once; shared by every request (it serialises the network work).
        settings: limits, deadlines, token and the Grad-CAM default.
    """
    settings = settings or ServeSettings()
    # No Swagger/ReDoc pages: they load their JavaScript from a CDN (no network at run time).
    # The OpenAPI schema is served below, behind the token when there is one.
    app = FastAPI(title="covidcxr", version=__version__, description=MEDICAL_USE_BANNER, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.predictor = predictor
    app.state.settings = settings
    admission = Admission(settings.max_active, settings.max_queue, settings.max_pixels_in_flight, settings.queue_timeout)
    app.state.admission = admission
    # A fixed pool for the predictions: threads never grow with the load (each would also
    # get its own malloc arena). Created lazily: a limiter belongs to the running loop.
    limiter: list[anyio.CapacityLimiter] = []
    roots = _path_roots([getattr(getattr(predictor, "run", None), "run_dir", None) or ""])

    def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return _json_error(status, code, detail, headers, roots)

    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), settings.token.encode("utf-8")):
            raise Unauthorized("this service needs 'Authorization: Bearer <token>' with the token it was started with")

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        headers = None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, ServiceBusy):
            headers = {"Retry-After": str(settings.retry_after)}
        elif isinstance(exc, RequestTimeout):
            headers = {"Connection": "close"}
        return error(exc.status_code, exc.code, exc.detail, headers)

    @app.exception_handler(ImageReadError)
    async def _read_error(request: Request, exc: ImageReadError) -> JSONResponse:
        return error(422, "unreadable_image", exc.reason)  # the reason only: never a server path

    @app.exception_handler(CovidCXRError)
    async def _covidcxr_error(request: Request, exc: CovidCXRError) -> JSONResponse:
        return error(422, "invalid_input", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error(400, "bad_request", problems or "malformed request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, _STATUS_CODES.get(exc.status_code, "error"), str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        log.info("client went away during %s %s", request.method, request.url.path)
        return error(400, "bad_request", "the client disconnected before sending the whole request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal_error", "an unexpected error occurred; it has been logged")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        # On the event loop, touching nothing a prediction holds: it answers while every slot is busy.
        return {
            "status": "ok",
            "run": predictor.run.name,
            "engine": predictor.engine,
            "out_of_distribution_check": predictor.reference is not None,
            "auth_required": settings.token is not None,
            "max_upload_bytes": settings.max_upload_bytes,
            "load": admission.snapshot(),
            "version": __version__,
        }

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        require_token(request)
        return JSONResponse(app.openapi())

    @app.get("/model")
    async def model(request: Request) -> JSONResponse:
        require_token(request)
        return JSONResponse(redact_paths(await run_in_threadpool(predictor.model_card), roots))

    @app.post("/predict")
    async def predict(request: Request, gradcam: bool | None = None) -> JSONResponse:
        started = time.perf_counter()
        require_token(request)  # before a byte of the body is parsed
        admission.check_queue()  # a full queue is refused before the upload is read
        form = await request.form(max_files=1, max_fields=4)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise MissingUpload("send the image as multipart/form-data in the field 'file'")
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise UploadTooLarge(f"the file is over the {settings.max_upload_bytes}-byte limit")
            if not data:
                raise EmptyUpload("the uploaded file is empty (0 bytes)")
        finally:
            await form.close()
        use_gradcam = settings.gradcam if gradcam is None else gradcam
        pixels = declared_pixels(data) or 0
        await admission.enter(pixels)
        try:
            if not limiter:
                limiter.append(anyio.CapacityLimiter(settings.max_active))
            result = await anyio.to_thread.run_sync(predictor.predict_bytes, data, use_gradcam, limiter=limiter[0])
        except ServeError as exc:
            log.info("predict refused: %s (%d bytes, %.0f ms)", exc.code, len(data), (time.perf_counter() - started) * 1000)
            raise
        finally:
            await admission.leave(pixels)
            del data
            if pixels > TRIM_AFTER_PIXELS:
                release_free_memory()
        # No file name, no metadata beyond format and size: nothing identifying reaches the log.
        log.info(
            "predict ok: %s %dx%d, p=%.4f, %d warning(s), %.0f ms",
            result.input.format, result.input.width, result.input.height, result.probability, len(result.warnings),
            (time.perf_counter() - started) * 1000,
        )
        return JSONResponse(redact_paths(result.to_dict(), roots))

    # Starlette runs the last one added outermost: security headers wrap everything, then the
    # body deadline, then the body limit around the routes.
    app.add_middleware(UploadLimitMiddleware, max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(RequestDeadlineMiddleware, body_timeout=settings.body_timeout)
    app.add_middleware(SecurityHeadersMiddleware)
    return app
