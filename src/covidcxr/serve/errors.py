"""Errors of the inference service, each carrying the HTTP status it maps to.

Every one is a `covidcxr.errors.CovidCXRError`, so ``covidcxr predict`` prints it as one
red line like any other bad input, and the service turns it into a 4xx JSON body
``{"error": code, "detail": message}`` (`covidcxr.serve.app`). ``detail`` never holds a
server path or anything read from a DICOM header beyond what `covidcxr.io` exposes.
"""

from __future__ import annotations

from covidcxr.errors import CovidCXRError

__all__ = [
    "ServeError",
    "ServiceBusy",
    "RequestTimeout",
    "EmptyUpload",
    "MissingUpload",
    "UploadTooLarge",
    "ImageTooLarge",
    "UnsupportedImageType",
    "UnreadableImage",
    "NotAChestXray",
    "Unauthorized",
    "BadRequest",
    "EngineUnavailable",
]


class ServeError(CovidCXRError):
    """A request or an input the service refuses.

    Attributes:
        status_code: the HTTP status of the JSON error response.
        code: a short machine-readable name (``"unsupported_media_type"``...).
        detail: what was wrong and what was expected, in words.
    """

    status_code = 400
    code = "bad_request"

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)

    def to_json(self) -> dict[str, str]:
        """The response body: ``{"error": code, "detail": detail}``."""
        return {"error": self.code, "detail": self.detail}


class BadRequest(ServeError):
    """A malformed request (bad query parameter, malformed multipart body)."""


class MissingUpload(ServeError):
    """``POST /predict`` without a file in the multipart field ``file``."""

    code = "missing_file"


class EmptyUpload(ServeError):
    """The uploaded file has no bytes."""

    code = "empty_upload"


class UploadTooLarge(ServeError):
    """The request body is over the service's byte limit (refused before it is all read)."""

    status_code = 413
    code = "upload_too_large"


class ImageTooLarge(ServeError):
    """The image header declares more pixels than the limit (decompression-bomb guard)."""

    status_code = 413
    code = "image_too_large"


class UnsupportedImageType(ServeError):
    """The content is not PNG, JPEG, TIFF, BMP or DICOM (sniffed from the bytes, not the name)."""

    status_code = 415
    code = "unsupported_media_type"


class UnreadableImage(ServeError):
    """The content claims a supported format but cannot be decoded (truncated, corrupt, no pixels)."""

    status_code = 422
    code = "unreadable_image"


class NotAChestXray(ServeError):
    """A decodable image that is not a chest radiograph (colour photo, extreme aspect, CT...)."""

    status_code = 422
    code = "not_a_chest_xray"


class Unauthorized(ServeError):
    """A bearer token is required and the request has none, or a wrong one."""

    status_code = 401
    code = "unauthorized"


class EngineUnavailable(CovidCXRError):
    """The requested inference engine cannot run this run (e.g. no ONNX export yet)."""


class ServiceBusy(ServeError):
    """Every prediction slot (or the pixel budget) is taken and the queue is full or too slow: try again later."""

    status_code = 503
    code = "busy"


class RequestTimeout(ServeError):
    """The request body did not arrive within the service's deadline."""

    status_code = 408
    code = "request_timeout"
