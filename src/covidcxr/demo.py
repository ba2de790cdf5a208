"""The whole journey in one call: what `make demo` and ``covidcxr demo`` run.

Phantoms from three sites, a text marker planted on COVID images of one site →
the shipped lung U-Net, scored on the phantoms → preprocessing with a QC sheet →
stage 1, pneumonia-vs-normal pretraining → stage 2, COVID fine-tuning on two sites →
test on the seen sites' held-out patients *and* on the unseen third site → cross-source
evaluation → shortcut audit → ``OUT/report.html``. The report's findings name the marker.

With ``data`` (e.g. ``../shared/data/cxr``) the same journey runs on a real collection
(`recipes/demo_real*.yaml`): pretraining on Kermany pneumonia vs normal, fine-tuning on
Cohen COVID-19 images with NIH negatives, and every other source (Figure 1 among them)
left out of training entirely and tested as unseen — leave-source-out evaluation
(Tartaglione et al. 2020 §4.3; Ben Ahmed et al. 2021 §III).

Every stage is resumable: phantoms, cache entries and finished runs are reused, so a
second ``make demo`` only re-evaluates, re-audits and re-writes the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from covidcxr.errors import CovidCXRError

__all__ = ["DemoResult", "REAL_RECIPES", "SYNTHETIC_RECIPES", "planted_shortcut", "run_demo", "test_on_every_source"]

#: (pretraining recipe, fine-tuning recipe) of the synthetic and the real-data journeys
SYNTHETIC_RECIPES = ("recipes/demo_pretrain.yaml", "recipes/demo.yaml")
REAL_RECIPES = ("recipes/demo_real_pretrain.yaml", "recipes/demo_real.yaml")


@dataclass
class DemoResult:
    """What the journey produced (paths) and the headline numbers it printed."""

    out: Path
    pretrain_run: Path
    run: Path
    report: Path
    results_json: Path
    audit: dict[str, Any]
    evaluation: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _recipe_path(name: str, repo_root: Path | None) -> Path:
    """A recipe shipped in the repository's ``recipes/`` (the demo runs from a checkout)."""
    candidates = [repo_root / name] if repo_root is not None else []
    candidates += [Path(name), Path(__file__).resolve().parents[2] / name]
    for path in candidates:
        if path.is_file():
            return path
    raise CovidCXRError(f"demo recipe {name} not found (looked in {', '.join(str(c) for c in candidates)}); run the demo from the repository root")


_KINDS = {"marker": "a text marker", "window": "an intensity-window change"}


def planted_shortcut(recipe: Any) -> dict[str, Any] | None:
    """The shortcut a synthetic recipe plants, as the report's ground truth (None: none planted).

    Args:
        recipe: a validated training recipe (``data.synthetic.shortcut``).

    Returns:
        ``{"kind", "site", "label", "strength", "false_rate", "description"}``, e.g. the
        description "a text marker was planted on COVID images of site_a"; the report checks
        the audit's findings against ``site`` (:func:`covidcxr.report.results.ground_truth_outcome`).

    Example::

        >>> from covidcxr.train.recipe import load_recipe                 # doctest: +SKIP
        >>> planted_shortcut(load_recipe("recipes/demo.yaml"))["description"]  # doctest: +SKIP
        'a text marker was planted on COVID images of site_a'
    """
    synthetic = getattr(recipe.data, "synthetic", None)
    shortcut = getattr(synthetic, "shortcut", None) if synthetic is not None else None
    if shortcut is None:
        return None
    label = "COVID" if shortcut.label == "covid" else shortcut.label
    where = f"of {shortcut.site}" if shortcut.site else "of every site"
    return {
        "kind": shortcut.kind,
        "site": shortcut.site,
        "label": shortcut.label,
        "strength": float(shortcut.strength),
        "false_rate": float(shortcut.false_rate),
        "description": f"{_KINDS.get(shortcut.kind, 'a ' + shortcut.kind)} was planted on {label} images {where}",
    }


def test_on_every_source(run_dir: Path, pretrain_dir: Path | None = None, progress: bool = False) -> pd.DataFrame:
    """Add the run's predictions on sources it never trained on to ``predictions.parquet``.

    The run's own test split covers its seen sources; every image of an unseen source that
    fits the task (and shares no patient or near-duplicate with the training data) is
    scored by the run's best checkpoint and appended with ``split = "test"`` and
    ``test_set = "unseen_source"``, so `evaluate_run`, the audit and the report see seen
    and unseen sources side by side. Idempotent: earlier unseen-source rows are replaced.

    Args:
        run_dir: the trained run.
        pretrain_dir: its stage-1 run *on the same collection*, whose train/val patients
            are excluded too (`covidcxr.experiments.testsets.test_images`).
        progress: progress bars.

    Returns:
        The unseen-source rows added (may be empty).
    """
    from covidcxr.experiments.testsets import predict_images, test_images
    from covidcxr.rundir import RunDir
    from covidcxr.train.inference import load_run

    run = load_run(run_dir)
    rows = test_images(run.recipe, run_dir, pretrain_dir=pretrain_dir, sources="all")
    unseen = rows[~rows["seen"].astype(bool)].drop(columns=["seen", "linked_out"], errors="ignore")
    rd = RunDir(run_dir)
    predictions = rd.read_predictions()
    if "test_set" in predictions.columns:
        predictions = predictions[predictions["test_set"] != "unseen_source"]
    else:
        predictions["test_set"] = "split"
    if unseen.empty:
        return unseen
    scored, _rejected = predict_images(run_dir, unseen.reset_index(drop=True), progress=progress)
    scored = scored.assign(split="test", test_set="unseen_source", run=run.name)
    scored["predicted"] = (scored["probability"] >= run.threshold).astype("int64")
    keep = [c for c in predictions.columns if c in scored.columns]
    combined = pd.concat([predictions, scored[keep]], ignore_index=True)
    rd.write_predictions(combined)
    return scored[keep]


def _prepare(recipe: Any, out: Path, synthetic: bool, progress: bool, say: Callable[[str], None]) -> None:
    """Stages 0-2: the images (phantoms written if synthetic), lung segmentation scored on
    them (phantoms only: their masks are exact), preprocessing into the shared cache + QC."""
    from covidcxr.preprocess.cache import preprocess_collection
    from covidcxr.preprocess.lungs import LungSegmenter, evaluate_segmenter
    from covidcxr.preprocess.qc import write_qc
    from covidcxr.train.data import load_records, select_task

    manifest, rejected = load_records(recipe, progress=progress)
    folder = Path(recipe.data.collection)
    counts = manifest.groupby(["source", "label"]).size().unstack(fill_value=0)
    say(f"data: {len(manifest)} images of {manifest['patient_id'].nunique()} patients from {folder} ({len(rejected)} rejected)\n{counts.to_string()}")
    if synthetic:
        shortcut = recipe.data.synthetic.shortcut
        if shortcut is not None:
            say(f"planted shortcut: a {shortcut.kind} on {shortcut.label} images at {shortcut.site or 'every site'} (strength {shortcut.strength}, false rate {shortcut.false_rate})")
        scores = evaluate_segmenter(LungSegmenter.load(), manifest, convention="heart_excluded").summary
        per_site = ", ".join(f"{site} {row['dice_mean']:.3f}" for site, row in scores["per_source"].items())
        say(f"lung segmentation (shipped U-Net) on phantoms it never saw: Dice {scores['dice_mean']:.3f} ({per_site})")
    every_source = recipe.model_copy(deep=True)
    every_source.data.sources = []
    every_source.data.negatives_from = []
    rows, _ = select_task(manifest, every_source)
    config = recipe.preprocess.to_config()
    result = preprocess_collection(rows, config, recipe.preprocess.cache_dir, progress=progress)
    paths = write_qc(result.index, result.config_dir, sample=12)
    say(
        f"preprocessed {result.processed} images ({result.hits} from the cache, {len(result.rejected)} rejected) "
        f"in {result.seconds:.1f} s; QC: {paths.get('contact_sheet', paths['qc_csv'])}"
    )


def _export_for_serving(run_dir: Path, say: Callable[[str], None]) -> None:
    """ONNX export of the demo run for predict/serve (engine ``auto`` picks it up); a failure is said, not raised."""
    from covidcxr.errors import CovidCXRError
    from covidcxr.serve.onnx_export import export_onnx

    try:
        summary = export_onnx(run_dir)
    except CovidCXRError as exc:
        say(f"ONNX export skipped ({exc}); `covidcxr predict/serve` will run on PyTorch")
        return
    say(f"ONNX export for `covidcxr predict/serve` (onnxruntime; largest probability difference to PyTorch "
        f"{summary['classifier']['max_abs_diff_probability']:.1e}, tolerance {summary['tolerance']:.0e})")


def run_demo(
    out: str | Path = "demo",
    data: str | Path | None = None,
    repo_root: str | Path | None = None,
    progress: bool = True,
    n_boot: int = 1000,
    say: Callable[[str], None] = print,
    onnx_export: bool = True,
) -> DemoResult:
    """Run the journey into ``out`` (see the module docstring).

    Args:
        out: folder for the phantoms, cache, runs, audit and report.
        data: a real collection instead of the phantoms.
        repo_root: where ``recipes/`` lives (default: the current directory, then the
            checkout this module is in).
        progress: progress bars.
        n_boot: patient-bootstrap resamples behind every CI.
        say: where one-line stage messages go.
        onnx_export: end with `covidcxr.serve.onnx_export.export_onnx` of the fine-tuned run,
            so ``covidcxr predict/serve`` on it run on onnxruntime (engine ``auto``: measured
            ~1.2-1.5x faster end to end for the demo's ResNet-18, ``benchmarks/bench_serve.py``).
            An export that cannot be made is said, not fatal.
    """
    from covidcxr.audit.run import audit_run
    from covidcxr.evaluate.cross_source import evaluate_run
    from covidcxr.report import write_report
    from covidcxr.train.recipe import load_recipe
    from covidcxr.train.run import train_recipe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(repo_root) if repo_root is not None else None
    pretrain_name, finetune_name = REAL_RECIPES if data is not None else SYNTHETIC_RECIPES
    timings: dict[str, float] = {}
    cache = str(out / "cache")
    common = [f"preprocess.cache_dir={cache}"]
    if data is not None:
        common.append(f"data.collection={Path(data).resolve()}")
    else:
        common_pre = [*common, f"data.collection={(out / 'phantoms-pretrain').resolve()}"]

    run_dir = out / "runs" / "finetune"
    finetune_overrides = [*common, f"output.run_dir={run_dir}"]
    if data is None:
        finetune_overrides.append(f"data.collection={(out / 'phantoms').resolve()}")
    pretrain_dir = out / "runs" / "pretrain"
    finetune = load_recipe(_recipe_path(finetune_name, root), [*finetune_overrides, f"model.pretrained={pretrain_dir}"])

    started = time.perf_counter()
    _prepare(finetune, out, synthetic=data is None, progress=progress, say=say)
    timings["data_segmentation_preprocess"] = time.perf_counter() - started

    started = time.perf_counter()
    pretrain_overrides = common if data is not None else common_pre
    pretrain = load_recipe(_recipe_path(pretrain_name, root), [*pretrain_overrides, f"output.run_dir={pretrain_dir}"])
    say(f"stage 1: pretraining {pretrain.model.name} on {pretrain.data.task} ({pretrain_name}) -> {pretrain_dir}")
    train_recipe(pretrain, progress=progress, say=say)
    timings["pretrain"] = time.perf_counter() - started

    started = time.perf_counter()
    seen = ", ".join(finetune.data.sources + finetune.data.negatives_from) or "every source"
    say(f"stage 2: fine-tuning on {finetune.data.task} from {seen} ({finetune_name}) -> {run_dir}")
    train_recipe(finetune, progress=progress, say=say)
    timings["finetune"] = time.perf_counter() - started

    started = time.perf_counter()
    # the synthetic stage 1 uses its own phantom collection (other patients, same id scheme):
    # only a real collection's pretraining shares patients with the fine-tuning data
    added = test_on_every_source(run_dir, pretrain_dir=pretrain_dir if data is not None else None, progress=progress)
    unseen = sorted(added["source"].astype(str).unique()) if len(added) else []
    say(f"testing on unseen sources {unseen or '(none)'}: {len(added)} images added to the test set")
    evaluation = evaluate_run(run_dir, n_boot=n_boot)
    timings["test_and_evaluate"] = time.perf_counter() - started

    started = time.perf_counter()
    say("shortcut audit: source probe, lung ablation, Grad-CAM lung focus, t-SNE")
    audit = audit_run(run_dir, n_boot=n_boot, progress=progress, say=say)
    timings["audit"] = time.perf_counter() - started

    started = time.perf_counter()
    truth = planted_shortcut(finetune) if data is None else None
    paths = write_report([run_dir], out / "report.html", n_boot=n_boot, title=f"covidcxr demo: {finetune.name}", ground_truth=truth)
    timings["report"] = time.perf_counter() - started
    if onnx_export:
        started = time.perf_counter()
        _export_for_serving(run_dir, say)
        timings["onnx_export"] = time.perf_counter() - started
    return DemoResult(
        out=out,
        pretrain_run=pretrain_dir,
        run=run_dir,
        report=Path(paths.html),
        results_json=Path(paths.json),
        audit=audit,
        evaluation=evaluation,
        seconds={k: round(v, 1) for k, v in timings.items()},
    )
