"""The inference service: FastAPI app, upload safety, and the web page.

Routes:

* ``GET /`` — a plain page (HTML + a little vanilla JavaScript, served from this package,
  nothing from the network) to upload an image and see the result beside the overlays
  and warnings;
* ``POST /predict`` — multipart upload in the field ``file`` (PNG, JPEG, TIFF, BMP or
  DICOM, told apart by content); query ``gradcam=true|false`` (default: the service's
  setting). Returns the `covidcxr.serve.predictor.Prediction` as JSON, overlays as
  ``data:image/png;base64`` URIs;
* ``GET /model`` — the model card (`covidcxr.serve.model_card`);
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
* optional bearer token (``token``): ``/predict`` and ``/model`` then need
  ``Authorization: Bearer <token>`` (compared in constant time); ``/`` and ``/health``
  stay open so the page can load and ask for it;
* every bad input is a 4xx JSON body ``{"error": code, "detail": message}`` — 400
  missing/empty file or malformed request, 401 token, 413 too large, 415 not an image,
  422 unreadable or not a chest radiograph; an unexpected failure is a 500 with no
  internals in the body (the traceback goes to the log).

Example:
    >>> app = create_app(Predictor.load("runs/demo"), ServeSettings(token="s3cret"))   # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                                 # doctest: +SKIP
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from covidcxr import MEDICAL_USE_BANNER, __version__
from covidcxr.errors import CovidCXRError, ImageReadError
from covidcxr.serve.errors import (
    EmptyUpload,
    MissingUpload,
    ServeError,
    Unauthorized,
    UploadTooLarge,
)

__all__ = ["ServeSettings", "UploadLimitMiddleware", "create_app", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Room for the multipart boundary and part headers on top of the file's own bytes.
MULTIPART_OVERHEAD = 64 * 1024
log = logging.getLogger("covidcxr.serve")

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "upload_too_large", 415: "unsupported_media_type", 422: "unprocessable"}
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
        token: bearer token required on ``/predict`` and ``/model``; None = open.
        gradcam: compute Grad-CAM unless the request says ``gradcam=false``.
    """

    max_upload_bytes: int = 50 * 1024 * 1024
    token: str | None = None
    gradcam: bool = True


def _json_error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


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
        settings: limits, token and the Grad-CAM default.
    """
    settings = settings or ServeSettings()
    # No Swagger/ReDoc pages: they load their JavaScript from a CDN (no network at run time).
    app = FastAPI(title="covidcxr", version=__version__, description=MEDICAL_USE_BANNER, docs_url=None, redoc_url=None)
    app.state.predictor = predictor
    app.state.settings = settings

    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), settings.token.encode("utf-8")):
            raise Unauthorized("this service needs 'Authorization: Bearer <token>' with the token it was started with")

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return _json_error(exc.status_code, exc.code, exc.detail, headers)

    @app.exception_handler(ImageReadError)
    async def _read_error(request: Request, exc: ImageReadError) -> JSONResponse:
        return _json_error(422, "unreadable_image", exc.reason)  # the reason only: never a server path

    @app.exception_handler(CovidCXRError)
    async def _covidcxr_error(request: Request, exc: CovidCXRError) -> JSONResponse:
        return _json_error(422, "invalid_input", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _json_error(400, "bad_request", problems or "malformed request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(exc.status_code, _STATUS_CODES.get(exc.status_code, "error"), str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _json_error(500, "internal_error", "an unexpected error occurred; it has been logged")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "run": predictor.run.name,
            "engine": predictor.engine,
            "out_of_distribution_check": predictor.reference is not None,
            "auth_required": settings.token is not None,
            "max_upload_bytes": settings.max_upload_bytes,
            "version": __version__,
        }

    @app.get("/model")
    async def model(request: Request) -> dict[str, Any]:
        require_token(request)
        return await run_in_threadpool(predictor.model_card)

    @app.post("/predict")
    async def predict(request: Request, gradcam: bool | None = None) -> JSONResponse:
        started = time.perf_counter()
        require_token(request)  # before a byte of the body is parsed
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
        try:
            result = await run_in_threadpool(predictor.predict_bytes, data, use_gradcam)
        except ServeError as exc:
            log.info("predict refused: %s (%d bytes, %.0f ms)", exc.code, len(data), (time.perf_counter() - started) * 1000)
            raise
        # No file name, no metadata beyond format and size: nothing identifying reaches the log.
        log.info(
            "predict ok: %s %dx%d, p=%.4f, %d warning(s), %.0f ms",
            result.input.format, result.input.width, result.input.height, result.probability, len(result.warnings),
            (time.perf_counter() - started) * 1000,
        )
        return JSONResponse(result.to_dict())

    # Starlette runs the last one added outermost: security headers wrap everything, the body limit wraps the routes.
    app.add_middleware(UploadLimitMiddleware, max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(SecurityHeadersMiddleware)
    return app

