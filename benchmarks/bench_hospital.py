"""A hospital's PACS export: reading the folder (sniffing, headers, hashed Patient IDs, sha1),
grouping copies and near-duplicates from the pixels, and decoding JPEG Lossless DICOMs."""

from __future__ import annotations

import time

import numpy as np

N_PATIENTS = 50
IMAGES_PER_PATIENT = 2
SIZE = 1024


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def _export(folder) -> tuple[list, list]:
    """100 extension-less 1024 x 1024 12-bit DICOMs in covid/ and normal/; every 5th re-encoded as JPEG Lossless."""
    import gdcm

    from covidcxr.io import write_dicom

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = 0.8 - 0.5 * (np.exp(-((cols - 0.3) ** 2 + (rows - 0.5) ** 2) * 12) + np.exp(-((cols - 0.7) ** 2 + (rows - 0.5) ** 2) * 12))
    plain, lossless = [], []
    for patient in range(N_PATIENTS):
        label = "covid" if patient % 2 else "normal"
        for image in range(IMAGES_PER_PATIENT):
            pixels = np.clip((base + 0.05 * rng.standard_normal((SIZE, SIZE))) * 4095, 0, 4095).astype(np.uint16)
            path = write_dicom(folder / label / f"1.2.{patient}.{image}", pixels, "MONOCHROME2", 12, PatientID=f"MRN{patient:06d}", Modality="DX")
            if (patient * IMAGES_PER_PATIENT + image) % 5 == 0:
                reader = gdcm.ImageReader()
                reader.SetFileName(str(path))
                reader.Read()
                change = gdcm.ImageChangeTransferSyntax()
                change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
                change.SetInput(reader.GetImage())
                change.Change()
                writer = gdcm.ImageWriter()
                writer.SetFileName(str(path))
                writer.SetFile(reader.GetFile())
                writer.SetImage(change.GetOutput())
                writer.Write()
                lossless.append(path)
            else:
                plain.append(path)
    return plain, lossless


def bench_pacs_export(context) -> dict:
    """Read a 100-image PACS export (adapter), group copies/near-duplicates (1 worker), decode per syntax."""
    from covidcxr.data.sources import load_source
    from covidcxr.data.splits import link_duplicates
    from covidcxr.io import read_image

    folder = context.scratch / "pacs_export"
    plain, lossless = _export(folder)
    start = time.perf_counter()
    manifest = load_source(folder, "hospital").manifest
    adapter_seconds = time.perf_counter() - start
    start = time.perf_counter()
    linked, _ = link_duplicates(manifest, workers=1)
    link_seconds = time.perf_counter() - start
    timings = {}
    for name, paths in (("uncompressed", plain[:20]), ("jpeg_lossless", lossless[:20])):
        start = time.perf_counter()
        for path in paths:
            read_image(path)
        timings[name] = _rate(len(paths), time.perf_counter() - start)
    return {
        "images": int(len(manifest)),
        "patients": int(manifest["patient_id"].nunique()),
        "adapter_images_per_s": _rate(len(manifest), adapter_seconds),
        "link_duplicates_1_worker_images_per_s": _rate(len(linked), link_seconds),
        "decode_1024px_12bit_uncompressed_images_per_s": timings["uncompressed"],
        "decode_1024px_12bit_jpeg_lossless_images_per_s": timings["jpeg_lossless"],
    }


BENCHMARKS = [bench_pacs_export]
