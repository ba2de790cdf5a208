from __future__ import annotations

import pytest

from covidcxr.data.compose import Composition, compose, composition_table
from covidcxr.data.splits import split_train_val_test
from covidcxr.errors import CovidCXRError


@pytest.fixture()
def split(tiny_manifest):
    return split_train_val_test(tiny_manifest, stratify=("source", "label"), seed=0)


def test_single_source_subsampled_to_balance(split):
    composed = compose(split, Composition("a", sources=("site_a",), balance="subsample"))
    assert set(composed["source"]) == {"site_a"}
    train = composed[composed["split"] == "train"]
    assert (train["target"] == 1).sum() == (train["target"] == 0).sum() > 0
    # test keeps its natural prevalence: all site_a test rows
    assert len(composed[composed["split"] == "test"]) == len(split[(split["split"] == "test") & (split["source"] == "site_a")])


def test_borrowed_negatives_balance_training_and_keep_their_source(split):
    # covid vs normal: site_a has fewer normals than covid cases, so site_b must lend some
    spec = Composition("a+b", sources=("site_a",), negatives_from=("site_b",), negative_labels=("normal",))
    composed = compose(split, spec, seed=1)
    train = composed[composed["split"] == "train"]
    positives = (train["target"] == 1).sum()
    assert positives == (train["target"] == 0).sum()
    borrowed = train[train["role"] == "borrowed"]
    assert len(borrowed) > 0 and set(borrowed["source"]) == {"site_b"} and (borrowed["target"] == 0).all()
    own_negatives = split[(split["split"] == "train") & (split["source"] == "site_a") & (split["label"] == "normal")]
    assert len(borrowed) == positives - len(own_negatives)
    table = composition_table(composed)
    assert table.loc[("train", "site_b"), "+"] == 0 and table.loc[("train", "site_b"), "-"] == len(borrowed)
    assert set(composed["composition"]) == {"a+b"}
    assert "pneumonia" not in set(composed["label"])


def test_composition_errors_name_the_problem(split, tiny_manifest):
    with pytest.raises(CovidCXRError, match="split manifest"):
        compose(tiny_manifest, Composition("a", sources=("site_a",)))
    with pytest.raises(CovidCXRError, match="'site_z' is not in the manifest"):
        compose(split, Composition("z", sources=("site_z",)))
    with pytest.raises(CovidCXRError, match="cannot balance"):
        compose(split, Composition("b", sources=("site_b",), balance="subsample"))  # site_b has no covid
    with pytest.raises(CovidCXRError, match="unknown label"):
        Composition("x", sources=("site_a",), positive_labels=("covid19",))
