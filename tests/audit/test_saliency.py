import numpy as np
import pandas as pd
import pytest

from covidcxr.audit.saliency import lung_focus_fraction, summarize_lung_focus
from covidcxr.errors import CovidCXRError


def test_lung_focus_fraction_is_the_share_of_mass_inside_the_mask():
    maps = np.zeros((3, 4, 4))
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[:, :, :2] = True  # left half is "lung"
    maps[0, :, :2] = 1.0  # all inside
    maps[1] = 1.0  # uniform: the lung-area fraction
    maps[1, 0, 3] = 3.0  # extra mass outside: 8 inside of 8 + 7 + 3 = 18
    fractions = lung_focus_fraction(maps, masks)
    assert fractions[0] == pytest.approx(1.0)
    assert fractions[1] == pytest.approx(8 / 18)
    assert np.isnan(fractions[2])  # empty map: nothing to attribute


def test_lung_focus_fraction_rejects_bad_input():
    with pytest.raises(CovidCXRError, match="differ in shape"):
        lung_focus_fraction(np.ones((1, 4, 4)), np.ones((1, 4, 5), dtype=bool))
    with pytest.raises(CovidCXRError, match="non-negative"):
        lung_focus_fraction(-np.ones((1, 4, 4)), np.ones((1, 4, 4), dtype=bool))


def test_summary_per_source_and_label():
    table = pd.DataFrame({
        "source": ["a", "a", "a", "b"],
        "label": ["covid", "covid", "covid", "normal"],
        "lung_focus": [0.2, 0.6, np.nan, 0.9],
        "lung_area": [0.25, 0.25, 0.3, 0.2],
    })
    summary = summarize_lung_focus(table).set_index("source")
    assert summary.loc["a", "n"] == 3
    assert summary.loc["a", "lung_focus_median"] == pytest.approx(0.4)
    assert summary.loc["a", "share_mostly_outside"] == pytest.approx(0.5)
    assert summary.loc["b", "lung_area_median"] == pytest.approx(0.2)
