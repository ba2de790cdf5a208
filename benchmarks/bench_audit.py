"""The audit measures its own accuracy: detection and false-alarm rates of its verdict on phantoms.

For each seed and each planted condition, a demo-size classifier is trained on phantoms
(`covidcxr.data.synth`) of three sites that share ONE label mix (COVID vs normal, 50/50 at
every site: the site itself is no shortcut), then audited (`covidcxr.audit.run.audit_run`):

* ``marker``: a burned-in corner text on COVID images of site_a (strength 0.9, 0.05 on the rest);
* ``window``: a brighter, flatter global intensity window on COVID images of site_a;
* ``view``: COVID images of site_a are AP films, its other images PA (DeGrave et al. 2021);
* ``clean``: nothing planted (histogram equalisation on, as for marker and view);
* ``clean_noeq``: nothing planted, equalisation off (the false-alarm control of ``window``).

Figures: ``detection_rate`` (verdict ``shortcut`` on planted runs; goal 1.0) and
``false_alarm_rate`` (verdict ``shortcut`` on clean runs; goal 0.0), the same per shortcut type,
``ok_rate_clean`` (verdict ``ok`` on clean runs: a verdict that is never OK informs no one),
``no_skill_rate`` per type, and the mean test AUC per type (every model must demonstrably learn:
the clean runs' AUC says whether it did). Every run trains ``small_cnn`` at 128 px on 400
phantoms for 20 epochs on ONE thread (on phantoms a ResNet-18 from scratch at 96 px / 6
epochs reached test AUC 0.46–0.55: it learned nothing; this setting reached 0.70 [0.61, 0.80]
on a clean collection). Histogram equalisation is on, as in the demo, except for the window
condition: equalisation maps a global monotone window back onto the same histogram, so a
planted window would never reach the model (measured: mean |difference| 0.007 after
equalisation) and the condition would test nothing.

Environment: ``COVIDCXR_BENCH_AUDIT_SEEDS`` (default 10) seeds per condition,
``COVIDCXR_BENCH_AUDIT_TYPES`` (comma-separated subset of the conditions). Runs print progress.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

SEEDS = int(os.environ.get("COVIDCXR_BENCH_AUDIT_SEEDS", "10"))
TYPES = tuple(t for t in os.environ.get("COVIDCXR_BENCH_AUDIT_TYPES", "marker,window,view,clean,clean_noeq").split(",") if t)
#: the phantom and model settings: demo-size, chosen so a clean model has real skill (see the README)
SIZE = 128
N_IMAGES = 400
EPOCHS = 20
MODEL = "small_cnn"
N_BOOT = 200
#: histogram equalisation except where it would erase the planted shortcut (see the module docstring)
EQUALIZATION = {"window": "none", "clean_noeq": "none"}
LABEL_MIX = {"covid": 0.5, "normal": 0.5}


def recipe_for(root: Any, kind: str, seed: int) -> dict[str, Any]:
    """The training recipe of one benchmark run (``kind``: marker, window, view or clean)."""
    shortcut = None if kind.startswith("clean") else {"kind": kind, "site": "site_a", "label": "covid", "strength": 0.9, "false_rate": 0.05}
    return {
        "name": f"audit-{kind}-{seed}",
        "seed": seed,
        "data": {
            "synthetic": {"n_images": N_IMAGES, "size": SIZE, "seed": 1000 + seed, "shortcut": shortcut, "label_mix": LABEL_MIX},
            "task": "covid_vs_rest",
            "split": {"test_size": 0.4, "val_size": 0.25},
        },
        "preprocess": {"cache_dir": str(root / "cache"), "size": SIZE, "mask_source": "manifest", "lungs": "none", "equalization": EQUALIZATION.get(kind, "histogram"), "workers": 1},
        "model": {"name": MODEL},
        "optimizer": {"name": "adam", "lr": 1.0e-3},
        "train": {"epochs": EPOCHS, "batch_size": 16, "checkpoint_every_n_steps": 0},
        "augmentation": {"rotation_degrees": 4, "translation": 0.03, "hflip": 0.0},
        "engine": {"threads": 1, "progress_bar": False},
        "output": {"runs_dir": str(root / "runs")},
    }


def _one(root: Any, kind: str, seed: int) -> dict[str, Any]:
    from covidcxr.audit.run import audit_run
    from covidcxr.train.recipe import recipe_from_mapping
    from covidcxr.train.run import train_recipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_dir = train_recipe(recipe_from_mapping(recipe_for(root, kind, seed)), progress=False).run_dir
        report = audit_run(run_dir, n_boot=N_BOOT, seed=seed, write=False)
    auc = report["evaluation"]["overall"]["auc"]
    return {"kind": kind, "seed": seed, "verdict": report["verdict"], "auc": auc["estimate"], "auc_low": auc["low"],
            "shortcut_findings": [f["id"] for f in report["findings"] if f["severity"] == "shortcut"]}


def _rate(rows: list[dict[str, Any]], verdict: str) -> float | None:
    return round(sum(r["verdict"] == verdict for r in rows) / len(rows), 3) if rows else None


_CACHE: dict[str, dict[str, Any]] = {}


def _figures(context: Any) -> dict[str, Any]:
    """Verdict accuracy over ``SEEDS`` seeds x {marker, window, view, clean} (computed once per bench run)."""
    key = str(context.scratch)
    if key not in _CACHE:
        _CACHE[key] = _measure(context)
    return _CACHE[key]


def _measure(context: Any) -> dict[str, Any]:
    root = context.scratch / "audit-accuracy"
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in range(SEEDS):
        for kind in TYPES:
            t0 = time.perf_counter()
            row = _one(root, kind, seed)
            results.append(row)
            print(f"[bench audit] seed {seed} {kind:>6}: verdict {row['verdict']:<8} test AUC {row['auc']:.2f} (low {row['auc_low']:.2f}) "
                  f"shortcut findings {row['shortcut_findings']} — {time.perf_counter() - t0:.0f} s ({time.perf_counter() - started:.0f} s total)", flush=True)
    planted = [r for r in results if not r["kind"].startswith("clean")]
    clean = [r for r in results if r["kind"].startswith("clean")]
    figures: dict[str, Any] = {
        "detection_rate": _rate(planted, "shortcut"),
        "false_alarm_rate": _rate(clean, "shortcut"),
        "ok_rate_clean": _rate(clean, "ok"),
        "seeds": SEEDS,
        "settings": {"size": SIZE, "n_images": N_IMAGES, "epochs": EPOCHS, "model": MODEL, "equalization": {k: EQUALIZATION.get(k, "histogram") for k in TYPES}, "label_mix": LABEL_MIX},
    }
    for kind in TYPES:
        part = [r for r in results if r["kind"] == kind]
        figures[f"{kind}.shortcut_rate"] = _rate(part, "shortcut")
        figures[f"{kind}.no_skill_rate"] = _rate(part, "no_skill")
        figures[f"{kind}.mean_test_auc"] = round(sum(r["auc"] for r in part) / len(part), 3) if part else None
        figures[f"{kind}.verdicts"] = [r["verdict"] for r in part]
    figures["runs"] = results
    return figures


def bench_detection_rate(context: Any) -> dict[str, Any]:
    """``audit.detection_rate``: verdict ``shortcut`` on planted runs, overall and per shortcut type."""
    figures = _figures(context)
    keep = ("detection_rate", "seeds", "settings", "runs")
    return {k: v for k, v in figures.items() if k in keep or (k.split(".")[0] in ("marker", "window", "view"))}


def bench_false_alarm_rate(context: Any) -> dict[str, Any]:
    """``audit.false_alarm_rate``: verdict ``shortcut`` on clean runs, and the rate of OK verdicts on them."""
    figures = _figures(context)
    return {k: v for k, v in figures.items() if k in ("false_alarm_rate", "ok_rate_clean", "seeds") or k.startswith("clean")}


BENCHMARKS = [bench_detection_rate, bench_false_alarm_rate]
