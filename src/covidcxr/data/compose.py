"""Training-set compositions, as in Table 1 of Tartaglione et al. (2020).

A COVID source rarely has enough negatives, so papers borrow negatives from another
collection (often a pediatric pneumonia set) — and thereby plant a shortcut: the model
can tell the *sources* apart instead of the diseases. A `Composition` states exactly
which source gives what, and `compose` records the provenance of every image in the
``source`` and ``role`` columns so the audit can later ask "does the model predict the
source?".

Balancing follows §3.2: "Training-set data are finally balanced between COVID+ and
COVID−: where possible, we increased the COVID− cases (CORDA&ChestXRay, CORDA&RSNA),
where not possible we sub-sampled the more populated class."
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from covidcxr.data.manifest import LABELS, SPLITS, validate_manifest
from covidcxr.errors import CovidCXRError

Balance = Literal["none", "borrow", "subsample"]


@dataclass(frozen=True)
class Composition:
    """Which sources make a binary training set, and how it is balanced.

    Attributes:
        name: short name, e.g. ``"cohen"`` or ``"cohen+kermany"``.
        sources: sources contributing all their images (positives and negatives).
        negatives_from: sources lending negatives only (e.g. Kermany's pneumonia/normal).
        positive_labels: labels counted as positive (default ``("covid",)``).
        negative_labels: labels counted as negative; None means every other label.
        balance: ``"borrow"`` (add borrowed negatives up to the positives, then subsample
            the larger class), ``"subsample"`` (subsample the larger class) or ``"none"``.
        balance_splits: the splits balanced; test keeps its natural prevalence by default.

    Example:
        >>> Composition("cohen+kermany", sources=("cohen",), negatives_from=("kermany",)).describe()
        'cohen+kermany: covid vs rest from cohen; negatives borrowed from kermany; balance=borrow on train, val'
    """

    name: str
    sources: tuple[str, ...]
    negatives_from: tuple[str, ...] = ()
    positive_labels: tuple[str, ...] = ("covid",)
    negative_labels: tuple[str, ...] | None = None
    balance: Balance = "borrow"
    balance_splits: tuple[str, ...] = ("train", "val")

    def __post_init__(self) -> None:
        if not self.sources:
            raise CovidCXRError(f"composition {self.name!r}: name at least one source")
        for label in (*self.positive_labels, *(self.negative_labels or ())):
            if label not in LABELS:
                raise CovidCXRError(f"composition {self.name!r}: unknown label {label!r}; expected one of {list(LABELS)}")
        if self.balance not in ("none", "borrow", "subsample"):
            raise CovidCXRError(f"composition {self.name!r}: balance must be none, borrow or subsample, not {self.balance!r}")
        for split in self.balance_splits:
            if split not in SPLITS:
                raise CovidCXRError(f"composition {self.name!r}: unknown split {split!r} in balance_splits")

    @property
    def negatives(self) -> tuple[str, ...]:
        if self.negative_labels is not None:
            return self.negative_labels
        return tuple(label for label in LABELS if label not in self.positive_labels)

    def describe(self) -> str:
        lent = f"; negatives borrowed from {', '.join(self.negatives_from)}" if self.negatives_from else ""
        return (
            f"{self.name}: {'/'.join(self.positive_labels)} vs rest from {', '.join(self.sources)}{lent}; "
            f"balance={self.balance} on {', '.join(self.balance_splits)}"
        )


def _take(frame: pd.DataFrame, count: int, rng: np.random.Generator) -> pd.DataFrame:
    if count >= len(frame):
        return frame
    return frame.iloc[np.sort(rng.choice(len(frame), size=count, replace=False))]


def compose(manifest: pd.DataFrame, composition: Composition, seed: int = 0) -> pd.DataFrame:
    """Build a binary dataset from a split manifest according to ``composition``.

    Args:
        manifest: a manifest with a ``split`` column (see `covidcxr.data.splits`); splits
            come first so a borrowed negative is split by patient like any other image.
        composition: what to take from where.
        seed: random seed for borrowing and subsampling.

    Returns:
        The selected rows with three added columns: ``target`` (1 positive, 0 negative),
        ``role`` (``"own"`` or ``"borrowed"``) and ``composition`` (its name). The
        ``source`` column is kept, so every image's origin stays known.

    Raises:
        CovidCXRError: when the manifest has no ``split`` column, a named source is absent,
            or a balanced split ends up without positives or negatives.
    """
    if "split" not in manifest.columns:
        raise CovidCXRError("compose needs a split manifest: run a split from covidcxr.data.splits first")
    present = set(manifest["source"])
    for source in (*composition.sources, *composition.negatives_from):
        if source not in present:
            raise CovidCXRError(f"composition {composition.name!r}: source {source!r} is not in the manifest {sorted(present)}")
    positive = manifest["label"].isin(composition.positive_labels)
    negative = manifest["label"].isin(composition.negatives)
    own = manifest[manifest["source"].isin(composition.sources) & (positive | negative)].copy()
    own["role"] = "own"
    lender = manifest["source"].isin(composition.negatives_from) & ~manifest["source"].isin(composition.sources)
    lendable = manifest[lender & negative].copy()
    lendable["role"] = "borrowed"
    for frame in (own, lendable):
        frame["target"] = frame["label"].isin(composition.positive_labels).astype(np.int64)

    rng = np.random.default_rng(seed)
    parts: list[pd.DataFrame] = []
    for split in SPLITS:
        mine = own[own["split"] == split]
        lent = lendable[lendable["split"] == split]
        if split not in composition.balance_splits or composition.balance == "none":
            parts.extend([mine, lent])  # unbalanced: every lendable negative comes along
            continue
        positives, negatives = mine[mine["target"] == 1], mine[mine["target"] == 0]
        if composition.balance == "borrow" and len(negatives) < len(positives):
            borrowed = _take(lent, len(positives) - len(negatives), rng)
            negatives = pd.concat([negatives, borrowed])
        # subsample whichever class is still the larger one
        size = min(len(positives), len(negatives))
        if size == 0 and len(mine) > 0:
            raise CovidCXRError(
                f"composition {composition.name!r}: the {split} split has {len(positives)} positives and "
                f"{len(negatives)} negatives; cannot balance (add negatives_from or set balance='none')"
            )
        parts.extend([_take(positives, size, rng), _take(negatives, size, rng)])
    result = pd.concat(parts).sort_index()
    result["composition"] = composition.name
    return validate_manifest(result.reset_index(drop=True))


def composition_table(composed: pd.DataFrame) -> pd.DataFrame:
    """Counts like Tartaglione et al.'s Table 1: rows split × source, columns ``+``/``−`` and patients."""
    table = composed.pivot_table(index=["split", "source"], columns="target", values="image", aggfunc="count", fill_value=0)
    table = table.rename(columns={1: "+", 0: "-"}).reindex(columns=["+", "-"], fill_value=0)
    table["patients"] = composed.groupby(["split", "source"])["patient_id"].nunique()
    return table
