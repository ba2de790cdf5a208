"""The audit measures its own accuracy: detection and false-alarm rates of its verdict on phantoms.

For each seed and each condition, a small classifier is trained on phantoms
(`covidcxr.data.synth`) of three sites that share ONE label mix (COVID vs normal, 50/50 at
every site: the site itself is no shortcut), then audited (`covidcxr.audit.run.audit_run`):

* ``marker``: a burned-in corner text on COVID images (strength 0.9, 0.05 on the rest);
* ``window``: a brighter, flatter global intensity window on COVID images (same rates);
* ``view``: COVID images are AP films, the others PA (DeGrave et al. 2021);

each planted at every site (``SITE``: planted at one site of three, the window and view went
unlearned once the model could learn the disease itself);
* ``clean``: nothing planted — the false-alarm control of every planted type.

Every condition uses the same preprocessing, with histogram equalisation OFF: equalisation maps
a global monotone window back onto the same histogram (measured: mean |difference| 0.007), so a
planted window would never reach the model, and one shared preprocessing keeps ``clean`` the
control of all three planted types.

**Was the shortcut learned?** A shortcut the model never learned cannot be detected, so each
planted run is scored against counterfactuals: the same phantoms rendered with and without the
shortcut (the generator's plan does not depend on the shortcut, so collections of the same data
seed hold the same phantoms, pixel-identical except for it). Every test image of the planted
site is scored both ways (`learned_shift`), by the planted run and by the same seed's clean run;
the run *learned* the shortcut when the mean of its shift (with − without) beyond the clean
model's shift on the same pair has a 95% t-interval whose lower bound exceeds ``LEARNED_SHIFT``
(a clean model follows the window too: a brighter window brightens the lungs, the disease's own
sign). The absolute shift's verdict is kept as ``learned_absolute``. Detection is reported over all planted runs and over the runs that
learned their shortcut.

Which finding catches which shortcut (seeds 0–4): the marker — lung blanking; the view — the
metadata-only baseline and the within-label view dependence; the window — ``label_from_intensity``
(`covidcxr.audit.intensity.label_from_intensity`: the label predicted within a source from the
outside-lung intensity statistics, against the model's AUC on the same images), which reads the
data and the model's AUC, not which pixels the model read, so it also fires on window runs whose
model did not learn the window (read detection over learned runs beside detection over all).

Figures: ``detection_rate`` (verdict ``shortcut`` on planted runs; goal 1.0),
``detection_rate_learned`` (the same over runs that learned the shortcut), ``false_alarm_rate``
(verdict ``shortcut`` on clean runs; goal 0.0), ``ok_rate_clean`` (verdict ``ok`` on clean runs:
a verdict that is never OK informs no one), per type, each with its Wilson 95% interval and n
(n is small — 10 seeds per type — so the intervals are wide), and every run's verdict, test
AUC, learned shift and shortcut findings. The audit's rules were chosen on seeds 0–4
(``COVIDCXR_BENCH_AUDIT_FIRST_SEED=0 COVIDCXR_BENCH_AUDIT_SEEDS=5``); the reported rates are
on seeds 5–14 (the default), held out from that choice.

Environment: ``COVIDCXR_BENCH_AUDIT_SEEDS`` (default 10) seeds per condition starting at
``COVIDCXR_BENCH_AUDIT_FIRST_SEED`` (default 5), ``COVIDCXR_BENCH_AUDIT_TYPES`` (comma-separated
subset of the conditions), ``COVIDCXR_BENCH_AUDIT_PARTIAL`` (default
``$TMPDIR/covidcxr-bench-audit-partial.json``): after every run the table so far (the same
figures, ``runs_finished`` and ``runs_planned``) is written there atomically, so a benchmark
stopped early still reports what finished. Runs print progress.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

FIRST_SEED = int(os.environ.get("COVIDCXR_BENCH_AUDIT_FIRST_SEED", "5"))
SEEDS = int(os.environ.get("COVIDCXR_BENCH_AUDIT_SEEDS", "10"))
TYPES = tuple(t for t in os.environ.get("COVIDCXR_BENCH_AUDIT_TYPES", "clean,marker,window,view").split(",") if t)
#: the phantom and model settings: small enough for 40 runs on two cores, chosen so a clean model has real skill
SIZE = 64
N_IMAGES = 320
EPOCHS = 12
MODEL = "small_cnn"
N_BOOT = 200
EQUALIZATION = "none"
#: finding severity x2 (`synthesize(finding_scale=...)`): at 64 px the default opacities leave a small model near chance
FINDING_SCALE = 2.0
LABEL_MIX = {"covid": 0.5, "normal": 0.5}
#: a planted shortcut is "learned" when the mean probability shift it causes has a CI low above this
LEARNED_SHIFT = 0.05
#: where the shortcut is planted: every site (None). Planted at one of three sites, with findings a
#: small model can learn, the window and view shortcuts went unlearned (score shift 0.03 and 0.01 on
#: seed 0): the model had no reason to prefer them, and an unlearned shortcut tests nothing
SITE = None
#: where the table so far is written after every run (atomic JSON)
PARTIAL = Path(os.environ.get("COVIDCXR_BENCH_AUDIT_PARTIAL", str(Path(tempfile.gettempdir()) / "covidcxr-bench-audit-partial.json")))


def recipe_for(root: Any, kind: str, seed: int, n_images: int = N_IMAGES, epochs: int = EPOCHS) -> dict[str, Any]:
    """The training recipe of one benchmark run (``kind``: marker, window, view or clean)."""
    shortcut = None if kind == "clean" else {"kind": kind, "site": SITE, "label": "covid", "strength": 0.9, "false_rate": 0.05}
    return {
        "name": f"audit-{kind}-{seed}",
        "seed": seed,
        "data": {
            "synthetic": {"n_images": n_images, "size": SIZE, "seed": 1000 + seed, "shortcut": shortcut, "label_mix": LABEL_MIX, "finding_scale": FINDING_SCALE},
            "task": "covid_vs_rest",
            "split": {"test_size": 0.4, "val_size": 0.25},
        },
        "preprocess": {"cache_dir": str(Path(root) / "cache"), "size": SIZE, "mask_source": "manifest", "lungs": "none", "equalization": EQUALIZATION, "workers": 1},
        "model": {"name": MODEL},
        "optimizer": {"name": "adam", "lr": 2.0e-3},
        "train": {"epochs": epochs, "batch_size": 16, "checkpoint_every_n_steps": 0},
        "augmentation": {"rotation_degrees": 4, "translation": 0.03, "hflip": 0.0},
        "engine": {"threads": 1, "progress_bar": False},
        "output": {"runs_dir": str(Path(root) / "runs")},
    }


def _swap(rows: Any, recipe: dict[str, Any]) -> Any:
    """``rows`` with their pixels taken from the collection of ``recipe`` (same plan, same image ids)."""
    from covidcxr.train.data import load_records
    from covidcxr.train.recipe import recipe_from_mapping

    other, _ = load_records(recipe_from_mapping(recipe))
    other = other.assign(key=other["image"].map(lambda p: Path(p).name)).set_index("key")
    keys = rows["image"].map(lambda p: Path(p).name)
    out = rows.copy()
    for column in ("image", "mask", "sha1", "view", "shortcut"):
        if column in out.columns and column in other.columns:
            out[column] = other.loc[keys, column].to_numpy()
    return out


def _mean_ci(values: np.ndarray) -> dict[str, Any]:
    """Mean with its 95% t-interval (scipy) and n."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return {"estimate": None, "low": None, "high": None, "n_images": n}
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))
    mean = float(values.mean())
    return {"estimate": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4), "n_images": n}


def learned_shift(run_dir: Path, root: Any, kind: str, seed: int, n_images: int = N_IMAGES, epochs: int = EPOCHS, site: str | None = SITE,
                  clean_run: Path | None = None) -> dict[str, Any]:
    """How much the planted shortcut moves the run's score: the ground truth of "was it learned".

    Every test image of ``site`` (None: of every site) is scored with the shortcut and without it, the rest of the
    phantom pixel-identical (the generator's plan does not depend on the shortcut): "without"
    from the clean collection of the same data seed; "with" from the run's own collection for
    COVID images that carry it, and from a collection that plants it on every NORMAL image of
    ``site`` for the normal ones (a COVID image the model already scores near 1 cannot show a
    shift: the normal images can). Returns the mean shift (with − without) with a 95%
    t-interval and n; ``learned_absolute`` when its lower bound exceeds ``LEARNED_SHIFT``.
    With ``clean_run`` (the same seed's model trained without the shortcut) also the shift
    beyond that model's on the same image pairs (``beyond_clean``), and ``learned`` is judged on
    it: a clean model follows some shortcuts too (a brighter window brightens the lungs — more
    opacity, the disease's own sign), and that is not learning the shortcut.
    """
    import pandas as pd

    from covidcxr.train.inference import cached_inputs, load_run

    run = load_run(run_dir)
    manifest = pd.read_parquet(Path(run_dir) / "manifest.parquet")
    test = manifest[(manifest["split"] == "test") & ((manifest["source"] == site) if site else True)]
    carrying = test[(test["label"] == "covid") & test["shortcut"].astype(bool)]
    normal_recipe = recipe_for(root, kind, seed, n_images, epochs)
    normal_recipe["data"]["synthetic"]["shortcut"] = {"kind": kind, "site": site, "label": "normal", "strength": 1.0, "false_rate": 0.0}
    normals = _swap(test[test["label"] == "normal"], normal_recipe)
    with_rows = pd.concat([carrying, normals], ignore_index=True)
    without_rows = _swap(with_rows, recipe_for(root, "clean", seed, n_images, epochs))
    _, with_images, _, _ = cached_inputs(with_rows, run.recipe)
    _, without_images, _, _ = cached_inputs(without_rows, run.recipe)
    shift = run.predict(with_images) - run.predict(without_images)
    out = {**_mean_ci(shift), "n_covid": len(carrying), "n_normal": len(normals)}
    out["learned_absolute"] = out["low"] is not None and out["low"] > LEARNED_SHIFT
    out["learned"] = out["learned_absolute"]
    if clean_run is not None and Path(clean_run).is_dir():
        # a model trained WITHOUT the shortcut may follow it too (a brighter window brightens the
        # lungs: more opacity, the disease's own sign); learned = the shift beyond that model's
        clean = load_run(clean_run)
        beyond = _mean_ci(shift - (clean.predict(with_images) - clean.predict(without_images)))
        out["beyond_clean"] = beyond
        out["learned"] = beyond["low"] is not None and beyond["low"] > LEARNED_SHIFT
    return out


def one_run(root: Any, kind: str, seed: int, n_images: int = N_IMAGES, epochs: int = EPOCHS) -> dict[str, Any]:
    """Train, audit and (for a planted shortcut) measure whether it was learned: one benchmark row."""
    from covidcxr.audit.run import audit_run
    from covidcxr.train.recipe import recipe_from_mapping
    from covidcxr.train.run import train_recipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_dir = train_recipe(recipe_from_mapping(recipe_for(root, kind, seed, n_images, epochs)), progress=False).run_dir
        report = audit_run(run_dir, n_boot=N_BOOT, seed=seed, write=False)
        clean_run = Path(run_dir).parent / f"audit-clean-{seed}"
        shift = None if kind == "clean" else learned_shift(run_dir, root, kind, seed, n_images, epochs, clean_run=clean_run)
    # the whole audit report beside the run, for reading why a verdict came out as it did
    (Path(run_dir) / "bench-audit.json").write_text(json.dumps(report, default=str))
    auc = report["evaluation"]["overall"]["auc"]
    return {"kind": kind, "seed": seed, "verdict": report["verdict"], "auc": auc["estimate"], "auc_low": auc["low"],
            "learned": None if shift is None else shift["learned"], "shift": shift,
            "shortcut_findings": [f["id"] for f in report["findings"] if f["severity"] == "shortcut"],
            "warning_findings": [f["id"] for f in report["findings"] if f["severity"] == "warning"],
            "evidence": {f["id"]: f["value"] for f in report["findings"]}, "run_dir": str(run_dir)}


def _wilson(k: int, n: int) -> dict[str, Any]:
    """``k / n`` with its Wilson 95% interval (statsmodels; Wilson 1927 keeps coverage at small n and at 0 or 1)."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return {"estimate": None, "low": None, "high": None, "k": 0, "n": 0}
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    return {"estimate": round(k / n, 3), "low": round(float(low), 3), "high": round(float(high), 3), "k": k, "n": n}


def _count(rows: list[dict[str, Any]], verdict: str) -> dict[str, Any]:
    return _wilson(sum(r["verdict"] == verdict for r in rows), len(rows))


_CACHE: dict[str, dict[str, Any]] = {}


def _figures(context: Any) -> dict[str, Any]:
    """Verdict accuracy over ``SEEDS`` seeds x {clean, marker, window, view} (computed once per bench run)."""
    key = str(context.scratch)
    if key not in _CACHE:
        _CACHE[key] = _measure(context)
    return _CACHE[key]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The accuracy table of benchmark rows: overall and per type, each rate with its Wilson interval."""
    planted = [r for r in results if r["kind"] != "clean"]
    learned = [r for r in planted if r["learned"]]
    clean = [r for r in results if r["kind"] == "clean"]
    figures: dict[str, Any] = {
        "detection_rate": _count(planted, "shortcut")["estimate"],
        "detection": _count(planted, "shortcut"),
        "detection_learned": _count(learned, "shortcut"),
        "false_alarm_rate": _count(clean, "shortcut")["estimate"],
        "false_alarm": _count(clean, "shortcut"),
        "ok_rate_clean": _count(clean, "ok")["estimate"],
        "ok_clean": _count(clean, "ok"),
    }
    table = {}
    for kind in sorted({r["kind"] for r in results}):
        part = [r for r in results if r["kind"] == kind]
        row: dict[str, Any] = {"runs": len(part), "mean_test_auc": round(float(np.mean([r["auc"] for r in part])), 3),
                               "no_skill": sum(r["verdict"] == "no_skill" for r in part), "verdicts": [r["verdict"] for r in part]}
        if kind == "clean":
            row.update(false_alarm=_count(part, "shortcut"), ok=_count(part, "ok"))
        else:
            mine = [r for r in part if r["learned"]]
            row.update(learned=len(mine), learned_absolute=sum(bool((r["shift"] or {}).get("learned_absolute")) for r in part),
                       detected=_count(part, "shortcut"), detected_learned=_count(mine, "shortcut"))
        table[kind] = row
    figures["table"] = table
    return figures


def _settings() -> dict[str, Any]:
    return {"size": SIZE, "n_images": N_IMAGES, "epochs": EPOCHS, "model": MODEL, "equalization": EQUALIZATION, "label_mix": LABEL_MIX, "finding_scale": FINDING_SCALE, "learned_shift": LEARNED_SHIFT}


def write_partial(results: list[dict[str, Any]], path: Path = PARTIAL) -> None:
    """The table of the runs finished so far, written atomically to ``path`` (`covidcxr.io.atomic`)."""
    from covidcxr.io.atomic import atomic_write_text

    figures = {**summarize(results), "runs_finished": len(results), "runs_planned": SEEDS * len(TYPES),
               "seeds": list(range(FIRST_SEED, FIRST_SEED + SEEDS)), "settings": _settings(), "runs": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(figures, indent=1, default=str) + "\n")


def _measure(context: Any) -> dict[str, Any]:
    root = context.scratch / "audit-accuracy"
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    print(f"[bench audit] the table so far is written to {PARTIAL} after every run", flush=True)
    for seed in range(FIRST_SEED, FIRST_SEED + SEEDS):
        for kind in TYPES:
            t0 = time.perf_counter()
            row = one_run(root, kind, seed)
            results.append(row)
            shift = row["shift"] or {}
            print(f"[bench audit] seed {seed} {kind:>6}: verdict {row['verdict']:<8} test AUC {row['auc']:.2f} (low {row['auc_low']:.2f}) "
                  f"learned {row['learned']} (shift {shift.get('estimate')} [{shift.get('low')}, {shift.get('high')}]) "
                  f"shortcut {row['shortcut_findings']} warning {row['warning_findings']} — {time.perf_counter() - t0:.0f} s ({time.perf_counter() - started:.0f} s total)", flush=True)
            write_partial(results)
    figures = summarize(results)
    figures.update(seeds=list(range(FIRST_SEED, FIRST_SEED + SEEDS)), runs=results, settings=_settings())
    return figures


def bench_detection_rate(context: Any) -> dict[str, Any]:
    """``audit.detection_rate``: verdict ``shortcut`` on planted runs, overall, over learned runs, and per shortcut type."""
    figures = _figures(context)
    keep = ("detection_rate", "detection", "detection_learned", "seeds", "settings", "runs")
    return {**{k: figures[k] for k in keep}, "table": {k: v for k, v in figures["table"].items() if k != "clean"}}


def bench_false_alarm_rate(context: Any) -> dict[str, Any]:
    """``audit.false_alarm_rate``: verdict ``shortcut`` on clean runs, and the rate of OK verdicts on them."""
    figures = _figures(context)
    return {**{k: figures[k] for k in ("false_alarm_rate", "false_alarm", "ok_rate_clean", "ok_clean", "seeds")}, "table": {"clean": figures["table"].get("clean")}}


BENCHMARKS = [bench_detection_rate, bench_false_alarm_rate]
