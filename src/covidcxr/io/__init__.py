"""Reading and writing pixels: PNG/JPEG/TIFF/BMP/DICOM → float32 [0, 1] plus metadata."""

from covidcxr.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text, clean_stale_temps
from covidcxr.io.dicom import read_dicom, read_dicom_metadata
from covidcxr.io.image import DEFAULT_MAX_PIXELS, CXRImage, ImageMetadata, read_image, read_mask
from covidcxr.io.sniff import sniff_file, sniff_format
from covidcxr.io.writers import dicom_dataset, write_dicom, write_png

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CXRImage",
    "ImageMetadata",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_temps",
    "dicom_dataset",
    "read_dicom",
    "read_dicom_metadata",
    "read_image",
    "read_mask",
    "sniff_file",
    "sniff_format",
    "write_dicom",
    "write_png",
]
