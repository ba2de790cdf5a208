"""Reading and writing pixels: PNG/JPEG/TIFF/BMP/DICOM → float32 [0, 1] plus metadata."""

from covidcxr.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from covidcxr.io.writers import write_png

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "write_png"]
