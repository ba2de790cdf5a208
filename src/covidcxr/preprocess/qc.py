"""Quality control of a preprocessing run: a per-image table and a contact sheet to look at.

A lung mask that sits on the clavicles, a crop that cut off a costophrenic angle, or a
source whose masks are systematically smaller are all shortcuts in waiting; the only
reliable check is to look. `write_qc` writes, under ``CACHE/<hash16>/qc/``:

* ``qc.csv`` — one row per image: image, source, label, mask_area_fraction,
  left_right_balance, rejected_reason, cache (hit/miss/error), cache_key, mask_used,
  lung_height_ratio (shorter lung / taller lung) and possible_opacity_cut (the mask's
  shorter lung below `OPACITY_CUT_HEIGHT_RATIO` of the taller one: it may have cut away
  a consolidation; `covidcxr.preprocess.screening.opacity_cut_warnings`, the rule predict uses)
  and qc_unavailable (why those two are empty for an entry cached ``model_only``).
* ``findings.json`` — the share of images flagged ``possible_opacity_cut`` per source ×
  label: a flag that fires more on COVID/pneumonia images than on normals of the same
  source means masking removes disease from the classifier's input.
* ``contact_sheet.png`` — for a sample stratified over source × label (rejected images
  first in line, since they are the ones to check), one row per image: the equalised
  original | its lung mask (red) and crop box (yellow) | the model input as cached,
  labelled with source, label, file name, mask area, balance and any rejection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from covidcxr.data.manifest import is_missing
from covidcxr.io import atomic_path
from covidcxr.io.atomic import atomic_write_text
from covidcxr.preprocess.cache import CacheMiss, read_entry
from covidcxr.preprocess.screening import OPACITY_CUT_HEIGHT_RATIO, opacity_cut_warnings

QC_COLUMNS: tuple[str, ...] = (
    "image",
    "source",
    "label",
    "mask_area_fraction",
    "left_right_balance",
    "rejected_reason",
    "cache",
    "cache_key",
    "mask_used",
    "lung_height_ratio",
    "possible_opacity_cut",
    "qc_unavailable",
)

_TILE = 192
_LABEL_WIDTH = 260
_GAP = 4
_HEADER = 24


def qc_table(index: pd.DataFrame) -> pd.DataFrame:
    """The ``qc.csv`` columns from a cache index (``cache`` = the index's ``cache_status``)."""
    table = index.rename(columns={"cache_status": "cache"})
    return table[[c for c in QC_COLUMNS if c in table.columns]].copy()


def opacity_cut_flags(index: pd.DataFrame, config_dir: str | Path) -> pd.DataFrame:
    """``lung_height_ratio``, ``possible_opacity_cut`` and ``qc_unavailable`` per index row, from each entry's QC mask.

    Rows without a cache file or with a rejected segmentation get NaN / False; rows whose
    entry was cached ``model_only`` (no QC mask) get NaN / False and the reason in ``qc_unavailable``.

    Returns:
        A frame aligned with ``index`` (same index) holding the three columns.
    """
    from covidcxr.preprocess.lung_coverage import lung_shape

    ratios, unavailable = [], []
    for _, row in index.iterrows():
        ratio, reason = float("nan"), None
        if "cache_file" in row and not is_missing(row["cache_file"]) and is_missing(row.get("rejected_reason")):
            try:
                entry = read_entry(Path(config_dir) / str(row["cache_file"]))
                reason = entry.qc_unavailable
                ratio = ratio if reason else lung_shape(entry.qc_mask)["height_ratio"]
            except CacheMiss:
                pass
        ratios.append(ratio)
        unavailable.append(reason)
    ratio = pd.Series(ratios, index=index.index, dtype=float)
    return pd.DataFrame(
        {"lung_height_ratio": ratio, "possible_opacity_cut": ratio < OPACITY_CUT_HEIGHT_RATIO, "qc_unavailable": unavailable},
        index=index.index,
    )


def opacity_cut_summary(table: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """Share of images flagged ``possible_opacity_cut`` per ``source/label`` (images with a height ratio only)."""
    scored = table.dropna(subset=["lung_height_ratio"])
    keys = scored["source"].astype(str) + "/" + scored["label"].astype(str)
    return {
        str(key): {"n_images": int(len(group)), "flagged": int(group["possible_opacity_cut"].sum()), "share": round(float(group["possible_opacity_cut"].mean()), 4)}
        for key, group in scored.groupby(keys, sort=True)
    }


def sample_for_qc(index: pd.DataFrame, count: int = 24, seed: int = 0) -> pd.DataFrame:
    """A sample stratified over ``source × label``, rejected (but cached) images first.

    Up to a quarter of ``count`` goes to rejected images; the rest is drawn round-robin
    from every ``(source, label)`` group in turn, so small sources are not crowded out.
    Unreadable images (no cache file) cannot be shown and are left to ``qc.csv``.

    Example:
        >>> index = pd.DataFrame({"source": list("aaab"), "label": ["x", "x", "y", "x"],
        ...                       "cache_file": ["f"] * 4, "rejected_reason": [None] * 4})
        >>> sample_for_qc(index, 3).groupby(["source", "label"]).size().tolist()
        [1, 1, 1]
    """
    rng = np.random.default_rng(seed)
    usable = index[index["cache_file"].map(lambda v: not is_missing(v))]
    rejected = usable[usable["rejected_reason"].map(lambda v: not is_missing(v))]
    chosen: list = list(rng.permutation(rejected.index.to_numpy())[: max(0, count // 4)]) if len(rejected) else []
    rest = usable.drop(index=chosen)
    groups = [list(rng.permutation(frame.index.to_numpy())) for _, frame in rest.groupby(["source", "label"], sort=True)]
    while len(chosen) < count and any(groups):
        for group in groups:
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    return index.loc[chosen]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _grey_tile(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)).convert("RGB")


def _fit(tile: Image.Image) -> Image.Image:
    scale = _TILE / max(tile.size)
    size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
    return tile.resize(size, Image.Resampling.LANCZOS) if size != tile.size else tile


def _overlay(original: np.ndarray, mask: np.ndarray, crop_box: list | None, input_shape: list | None) -> Image.Image:
    rgb = np.repeat(np.clip(original, 0.0, 1.0)[..., None], 3, axis=2)
    red = np.array([1.0, 0.1, 0.1])
    rgb[mask] = 0.6 * rgb[mask] + 0.4 * red
    # The mask's outline, drawn solid, shows exactly where the lung border was put.
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    rgb[edge] = red
    tile = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
    if crop_box and input_shape:
        scale_y, scale_x = original.shape[0] / input_shape[0], original.shape[1] / input_shape[1]
        top, left, bottom, right = crop_box
        ImageDraw.Draw(tile).rectangle(
            [left * scale_x, top * scale_y, right * scale_x - 1, bottom * scale_y - 1], outline=(255, 220, 0), width=2
        )
    return tile


def _unavailable_tile() -> Image.Image:
    """The tile drawn where a ``model_only`` cache entry has no QC thumbnail."""
    tile = Image.new("RGB", (_TILE, _TILE), (48, 24, 24))
    text = "not cached:\ncache_mode\nmodel_only\n(rerun preprocess\nwith --cache full)"
    ImageDraw.Draw(tile).multiline_text((10, 60), text, fill=(255, 150, 150), font=_font(13), spacing=3)
    return tile


def contact_sheet(index: pd.DataFrame, config_dir: str | Path) -> Image.Image:
    """Draw the contact sheet for the given index rows (see the module docstring).

    Args:
        index: rows of a cache index (e.g. `sample_for_qc`'s), with ``cache_file``.
        config_dir: ``CACHE/<hash16>``, which ``cache_file`` is relative to.

    Returns:
        An RGB `PIL.Image.Image`.
    """
    config_dir = Path(config_dir)
    rows = []
    for _, row in index.iterrows():
        try:
            rows.append((row, read_entry(config_dir / str(row["cache_file"]))))
        except CacheMiss:
            continue
    # Two blocks side by side beyond 8 images, so the sheet stays viewable on one screen.
    blocks = 1 if len(rows) <= 8 else 2
    per_block = max(1, -(-len(rows) // blocks))
    cell = _LABEL_WIDTH + 3 * (_TILE + _GAP) + _GAP
    width = blocks * cell + (blocks - 1) * 12
    height = _HEADER + per_block * (_TILE + _GAP) + _GAP
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(12)
    for block in range(blocks):
        for column, title in enumerate(("equalised original", "lung mask (red), crop (yellow)", "model input (cached)")):
            draw.text((block * (cell + 12) + _LABEL_WIDTH + _GAP + column * (_TILE + _GAP), 4), title, fill=(230, 230, 230), font=font)
    if not rows:
        draw.text((8, _HEADER + 8), "no cached image to show", fill=(255, 120, 120), font=font)
    for number, (row, entry) in enumerate(rows):
        x0 = (number // per_block) * (cell + 12)
        y = _HEADER + (number % per_block) * (_TILE + _GAP)
        meta = entry.meta
        balance = meta.get("left_right_balance")
        lines = [
            f"{row.get('source', '?')} / {row.get('label', '?')}",
            Path(str(row["image"])).name[:36],
            f"lung area {meta.get('mask_area_fraction', float('nan')):.2f}",
            f"L/(L+R) {balance:.2f}" if balance is not None else "L/(L+R) n/a",
            f"mask: {meta.get('mask_used')}  cache: {row.get('cache_status', '?')}",
        ]
        shape_warnings = [] if meta.get("rejected_reason") or entry.qc_unavailable else opacity_cut_warnings(entry.qc_mask)
        if shape_warnings:
            lines.append("POSSIBLE OPACITY CUT")
        if entry.qc_unavailable:
            lines.append("no QC thumbnails (model_only)")
        draw.multiline_text((x0 + 8, y + 6), "\n".join(lines), fill=(230, 230, 230), font=small, spacing=3)
        reason = meta.get("rejected_reason")
        if reason:
            wrapped = [reason[i : i + 38] for i in range(0, min(len(reason), 38 * 4), 38)]
            draw.multiline_text((x0 + 8, y + 100), "REJECTED:\n" + "\n".join(wrapped), fill=(255, 110, 110), font=small, spacing=2)
        tiles = [
            _grey_tile(entry.qc_original) if entry.qc_original is not None else _unavailable_tile(),
            _overlay(entry.qc_original, entry.qc_mask, meta.get("crop_box"), meta.get("input_shape"))
            if entry.qc_original is not None and entry.qc_mask is not None
            else _unavailable_tile(),
            _grey_tile(entry.image),
        ]
        for column, tile in enumerate(tiles):
            tile = _fit(tile)
            x = x0 + _LABEL_WIDTH + _GAP + column * (_TILE + _GAP) + (_TILE - tile.width) // 2
            top = y + (_TILE - tile.height) // 2
            sheet.paste(tile, (x, top))
            if column == 2:
                # Outline the model input so its black padding stays visible on the sheet.
                draw.rectangle([x - 1, top - 1, x + tile.width, top + tile.height], outline=(90, 90, 90))
    return sheet


def write_qc(index: pd.DataFrame, config_dir: str | Path, sample: int = 24, seed: int = 0) -> dict[str, Path]:
    """Write ``qc/qc.csv`` (every image) and ``qc/contact_sheet.png`` (a stratified sample).

    Args:
        index: the run's index (`covidcxr.preprocess.cache.PreprocessResult.index`).
        config_dir: ``CACHE/<hash16>``.
        sample: images on the contact sheet (0 = no sheet).
        seed: sampling seed.

    Returns:
        ``{"qc_csv": path, "findings": path, "contact_sheet": path}`` (the sheet only when drawn).

    Example:
        >>> paths = write_qc(result.index, result.config_dir, sample=24)  # doctest: +SKIP
    """
    folder = Path(config_dir) / "qc"
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    table = qc_table(index.join(opacity_cut_flags(index, config_dir)))
    with atomic_path(folder / "qc.csv") as tmp:
        table.to_csv(tmp, index=False)
    paths["qc_csv"] = folder / "qc.csv"
    findings = {
        "possible_opacity_cut": {
            "rule": f"the mask's shorter lung below {OPACITY_CUT_HEIGHT_RATIO} of the taller one's height",
            "per_source_label": opacity_cut_summary(table),
        }
    }
    unavailable = table["qc_unavailable"].map(lambda v: not is_missing(v))
    if unavailable.any():
        # said, not skipped: these images have no lung height ratio and no opacity-cut flag
        findings["possible_opacity_cut"]["unavailable"] = {
            "n_images": int(unavailable.sum()),
            "reason": str(table.loc[unavailable, "qc_unavailable"].iloc[0]),
        }
    atomic_write_text(folder / "findings.json", json.dumps(findings, indent=2) + "\n")
    paths["findings"] = folder / "findings.json"
    if sample > 0:
        sheet = contact_sheet(sample_for_qc(index, sample, seed), config_dir)
        with atomic_path(folder / "contact_sheet.png") as tmp:
            sheet.save(tmp, format="PNG", optimize=False)
        paths["contact_sheet"] = folder / "contact_sheet.png"
    return paths
