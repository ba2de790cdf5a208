"""Patient identifiers as salted one-way hashes: the raw id never leaves this module.

A hospital's images identify patients by a medical record number (DICOM *Patient ID*, a
``patient_id`` column). covidcxr needs only to know which images share a patient, so an
id is replaced, as soon as it is read, by ``HMAC-SHA256(salt, id)`` (RFC 2104), of which
the first 20 hex digits (80 bits) are kept. The raw id is never stored, logged, returned
or put in an error message.

**Why a keyed hash with a per-collection salt.** Record numbers are short and often
sequential: a plain SHA-256 of ``"00123456"`` is reversed by hashing every candidate. With
a secret salt, the pseudonyms cannot be recomputed without it.

**Where the salt lives.** ``$COVIDCXR_PATIENT_SALT`` (any text of 16+ characters) when set;
otherwise the file ``<collection>/.covidcxr-salt``, created on the first read of the
collection (32 random bytes, hex, mode 0600). It is kept *with the images* and not beside
the manifests, splits, runs and reports because those outputs are what gets copied and
shared, while the images (as sensitive as the ids) stay in the hospital: a salt travelling
with the pseudonyms would let anyone holding a list of record numbers re-identify them.
The same salt gives the same pseudonyms on every read, so splits, runs and later
evaluations of one collection agree on who is who. A read-only collection needs the
environment variable.

Example:
    >>> salt = collection_salt("hospital_export/")  # doctest: +SKIP
    >>> pseudonymize("00123456", salt)  # doctest: +SKIP
    '5f0c2e9a41b7d3e86a10'
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import warnings
from pathlib import Path

SALT_ENV = "COVIDCXR_PATIENT_SALT"
SALT_FILE = ".covidcxr-salt"
PSEUDONYM_HEX_DIGITS = 20
_MIN_SALT_CHARS = 16


class SaltUnavailable(Exception):
    """The collection's salt can neither be read nor created (e.g. a read-only folder)."""


def pseudonymize(raw: str, salt: bytes) -> str:
    """``HMAC-SHA256(salt, raw)`` truncated to `PSEUDONYM_HEX_DIGITS` hex digits.

    Args:
        raw: the identifier, compared after stripping surrounding blanks.
        salt: the collection's secret (`collection_salt`).

    Returns:
        20 lower-case hex digits.

    Example:
        >>> len(pseudonymize("MRN-1", b"k" * 32)), pseudonymize("MRN-1", b"k" * 32) == pseudonymize(" MRN-1 ", b"k" * 32)
        (20, True)
    """
    digest = hmac.new(salt, str(raw).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX_DIGITS]


def collection_salt(root: str | Path) -> bytes:
    """The salt for the collection at ``root``: ``$COVIDCXR_PATIENT_SALT``, else ``root/.covidcxr-salt``.

    The file is created when absent (32 random bytes as hex, mode 0600); two processes
    creating it at once agree on one (the file appears complete or not at all, via a
    hard link that never overwrites).

    Raises:
        SaltUnavailable: the variable is too short, or the file can neither be read nor
            created; the message says what to do.
    """
    configured = os.environ.get(SALT_ENV)
    if configured is not None:
        if len(configured.strip()) < _MIN_SALT_CHARS:
            raise SaltUnavailable(f"${SALT_ENV} must hold at least {_MIN_SALT_CHARS} characters")
        return configured.strip().encode("utf-8")
    path = Path(root) / SALT_FILE
    if not path.is_file():
        _create_salt_file(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if len(text) < _MIN_SALT_CHARS:
        raise SaltUnavailable(f"{path} is shorter than {_MIN_SALT_CHARS} characters; delete it to make a new one")
    return text.encode("ascii")


def _create_salt_file(path: Path) -> None:
    temporary = path.with_name(f"{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # never replaces a salt another process just made
        except FileExistsError:
            pass
    except OSError as exc:
        raise SaltUnavailable(
            f"cannot create the patient-id salt {path} ({exc.strerror or exc}); "
            f"set ${SALT_ENV} to a secret of {_MIN_SALT_CHARS}+ characters for this collection"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def dicom_patient_pseudonym(path: str | Path, salt: bytes) -> str | None:
    """The pseudonym of a DICOM file's *Patient ID* (0010,0020), or None when it has none.

    Only that element is parsed (``specific_tags``); its value is hashed here and dropped.

    Raises:
        ValueError: the file cannot be parsed as DICOM (the message holds no header value).
    """
    import pydicom

    from covidcxr.io.sniff import has_dicom_preamble, read_head

    try:
        # pydicom's validation warnings quote the offending value: none may reach a log.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as handle:
                dataset = pydicom.dcmread(
                    handle, force=not has_dicom_preamble(read_head(path)), specific_tags=["PatientID"], stop_before_pixels=True
                )
            value = dataset.get("PatientID")
            value = None if value is None else str(value)
    except Exception:  # pydicom's own messages may quote header bytes: say nothing of them
        raise ValueError("unreadable DICOM header (Patient ID)") from None
    if value is None or not value.strip():
        return None
    return pseudonymize(value, salt)
