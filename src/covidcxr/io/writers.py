"""Writing images: PNG only, atomically, 8 or 16 bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from covidcxr.io.atomic import atomic_path


def write_png(path: str | Path, image: np.ndarray, bits: int = 8) -> Path:
    """Write a 2-D image as a greyscale PNG, atomically.

    Args:
        path: destination file.
        image: ``(H, W)`` array; floats are taken as [0, 1] and clipped, integers and bools
            are written as they are (bool → 0/255).
        bits: 8 or 16 (ignored for integer input, whose dtype decides).

    Returns:
        ``path`` as a `Path`.

    Example:
        >>> write_png("/tmp/x.png", np.zeros((4, 4), np.float32))  # doctest: +SKIP
    """
    if image.ndim != 2:
        raise ValueError(f"write_png expects a 2-D (H, W) image, got shape {image.shape}")
    if image.dtype == bool:
        pixels = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {bits}")
        top = 255 if bits == 8 else 65535
        pixels = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)
    elif image.dtype in (np.uint8, np.uint16):
        pixels = image
    else:
        raise ValueError(f"write_png cannot write dtype {image.dtype}; use float in [0,1], bool, uint8 or uint16")
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path


def dicom_dataset(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements: object):
    """A minimal single-frame Digital X-Ray DICOM dataset (uncompressed, explicit VR little endian).

    Used to make test fixtures and benchmark inputs; hospitals' own files are only read.

    Args:
        pixels: stored values as `pydicom.dataset.Dataset.set_pixel_data` takes them —
            ``(H, W)`` grey, ``(H, W, 3)`` colour, ``(frames, H, W)`` multi-frame; (un)signed
            8/16-bit — or None for a header without Pixel Data (an invalid file, for tests).
        photometric: ``MONOCHROME1``, ``MONOCHROME2``, ``RGB``...
        bits_stored: significant bits (default: the dtype's width).
        **elements: further DICOM attributes by keyword (``WindowCenter=40``, ``ViewPosition="PA"``).

    Returns:
        A `pydicom.dataset.FileDataset`.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    if pixels is not None:
        dataset.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    else:
        dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = 2, 2, 1
        dataset.PhotometricInterpretation = photometric
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return dataset


def write_dicom(path: str | Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements: object) -> Path:
    """Write `dicom_dataset` (same arguments) to ``path`` atomically, with the 128-byte preamble.

    Example:
        >>> write_dicom("/tmp/x.dcm", np.zeros((8, 8), np.uint16), "MONOCHROME1", 12,
        ...             WindowCenter=2048, WindowWidth=4096, ViewPosition="PA")  # doctest: +SKIP
    """
    path = Path(path)
    dataset = dicom_dataset(pixels, photometric, bits_stored, **elements)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path
