"""Package a trained, evaluated and audited run as a shipped model (``covidcxr/zoo/models/<name>/``).

``python -m covidcxr.zoo.package recipes/shipped_<name>.yaml <name> [--loso FILE]`` is the ONE
command that reproduces a shipped model from the repository root: it trains the recipe
(`covidcxr.train.run.train_recipe`: a finished run is reused, an interrupted one resumed),
evaluates it on its test split (``covidcxr evaluate RUN``) and audits it (``covidcxr audit
RUN``) where that is not done yet, then (given a run directory instead of a recipe, only this):

1. copies the read side of the run (`covidcxr.rundir.RunDir` paths: ``config.yaml``,
   ``manifest.parquet``, ``predictions.parquet``, ``metrics.json``, ``evaluation.json``,
   ``operating_point.json``, ``audit/audit.json``, ``excluded.csv``, ``train_log.csv``) with
   this machine's absolute paths replaced by the recipe's relative ones (a served model card
   must not show a server path);
2. writes ``checkpoints/best.ckpt`` with the model's weights in float16 and nothing else
   (no optimizer state): half the bytes of float32 (ResNet-18: 22.4 MB instead of 44.7 MB, plus
   twice that of Adam state in a training checkpoint);
   `covidcxr.train.module.load_checkpoint_model` casts them back to float32;
3. builds ``inference/reference.npz`` (the out-of-distribution reference of
   `covidcxr.serve.reference`) **for the float16 weights**, embeddings stored as float16,
   so predict/serve from a read-only install never need the training images; and
   ``inference/seen_fingerprints.npz`` (`covidcxr.evaluate.seen_prints`), so ``evaluate
   --model NAME --data DIR`` excludes near-duplicates of its training images without them;
4. writes ``zoo.json`` (labels, resolution, operating point, audit verdict, training data,
   weights SHA-1, sizes) and ``MODEL_CARD.md`` (`covidcxr.zoo.card`);
5. replaces the old folder only once the new one is complete.

Example:
    >>> package_run("runs/shipped_covid", "covid", loso=Path("src/covidcxr/zoo/LOSO.md"))  # doctest: +SKIP
    PosixPath('.../covidcxr/zoo/models/covid')
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text
from covidcxr.rundir import RunDir

__all__ = ["half_checkpoint", "package_run", "portable_recipe", "prepare_run"]

#: Files of the run's read side that a shipped model carries (relative to the run).
COPIED = (
    RunDir.MANIFEST, RunDir.PREDICTIONS, RunDir.METRICS, RunDir.EVALUATION, RunDir.OPERATING_POINT,
    f"{RunDir.AUDIT}/{RunDir.AUDIT_FILE}", RunDir.EXCLUDED, RunDir.TRAIN_LOG,
)
REQUIRED = (RunDir.MANIFEST, RunDir.OPERATING_POINT, RunDir.EVALUATION, f"{RunDir.AUDIT}/{RunDir.AUDIT_FILE}")


def portable_recipe(recipe: dict[str, Any], collection: str | None) -> dict[str, Any]:
    """The run's resolved recipe with this machine's paths replaced: ``collection`` (None: kept), the default cache and runs folders."""
    out = json.loads(json.dumps(recipe))
    if collection is not None and out.get("data", {}).get("collection"):
        out["data"]["collection"] = collection
    out.setdefault("preprocess", {})["cache_dir"] = ".cache/covidcxr"
    out["output"] = {**out.get("output", {}), "runs_dir": "runs", "run_dir": None}
    return out


def half_checkpoint(source: Path, target: Path, recipe: dict[str, Any]) -> int:
    """Write ``source``'s model weights as float16 (plus its recipe and provenance) to ``target``; returns the bytes.

    Only floating-point tensors are halved (BatchNorm's ``num_batches_tracked`` stays int64).
    """
    from covidcxr.io.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(source)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    hyper = dict(checkpoint.get("hyper_parameters") or {})
    hyper["recipe"] = recipe
    slim = {"state_dict": state, "hyper_parameters": hyper, "covidcxr": {**(checkpoint.get("covidcxr") or {}), "weights_dtype": "float16"}}
    for key in ("epoch", "global_step"):
        if key in checkpoint:
            slim[key] = checkpoint[key]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        torch.save(slim, handle)  # a file object: the zip's inner folder is "archive", not the temporary name (same bytes every time)
    return target.stat().st_size


def _copy_read_side(run: RunDir, folder: Path, recipe: dict[str, Any]) -> None:
    missing = [name for name in REQUIRED if not (run.path / name).is_file()]
    if missing:
        raise CovidCXRError(f"run {run.path}: {missing[0]} is missing; a shipped model is trained, evaluated (`covidcxr evaluate RUN`) and audited (`covidcxr audit RUN`) first")
    for name in COPIED:
        if (run.path / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run.path / name, folder / name)
    import yaml

    atomic_write_text(folder / RunDir.CONFIG, yaml.safe_dump(recipe, sort_keys=False))
    metrics = run.read_metrics() or {}
    metrics["weights"] = {"kind": "checkpoint", "checkpoints": ["best.ckpt"]}  # the packaged file is the model
    RunDir(folder).write_metrics(metrics)


def _portable_paths(folder: Path, run_path: Path, root: str | None, collection: str | None) -> None:
    """No server path shipped: the training collection ``root`` becomes ``collection`` and the run's own folder ``.``.

    Rewrites the text columns (``image``, ``mask``, ``mask_alt``...) of ``manifest.parquet`` and ``predictions.parquet``
    and the text of the JSON and CSV files (``run_dir``, ``written_to``... fields).
    """
    if not root or collection is None:
        return
    pairs = [(str(Path(root)), collection.rstrip("/")), (str(run_path.resolve()), ".")]
    for name in (RunDir.MANIFEST, RunDir.PREDICTIONS):
        path = folder / name
        if not path.is_file():
            continue
        frame = pd.read_parquet(path)
        (old, new), prefix = pairs[0], pairs[0][0] + "/"
        for column in [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]:  # image, mask, mask_alt...; missing values stay
            frame[column] = [new + v[len(old) :] if isinstance(v, str) and v.startswith(prefix) else v for v in frame[column]]
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    prints = RunDir(folder).seen_fingerprints
    if prints.is_file():
        from covidcxr.evaluate.seen_prints import rewrite_stored_paths

        rewrite_stored_paths(prints, str(Path(root)), collection)
    for path in [*folder.rglob("*.json"), *folder.rglob("*.csv")]:
        text = path.read_text(encoding="utf-8")
        for old, new in pairs:
            text = text.replace(old, new)
        atomic_write_text(path, text)


def _build_reference(folder: Path) -> Any:
    """The out-of-distribution reference of the packaged (float16) weights, embeddings kept as float16."""
    from covidcxr.serve.engines import TorchClassifier
    from covidcxr.serve.reference import REFERENCE_FILE, build_reference
    from covidcxr.train.inference import load_run

    run = load_run(folder)
    classifier = TorchClassifier(run)
    reference = build_reference(run, classifier, classifier.module.stage_sizes(), progress=True)
    reference.embeddings = reference.embeddings.astype(np.float16)  # halves the file; loaded back as float32
    (folder / REFERENCE_FILE).parent.mkdir(parents=True, exist_ok=True)
    reference.save(folder / REFERENCE_FILE)
    return reference


def _training_data(manifest: pd.DataFrame) -> dict[str, Any]:
    """Images and patients per split, and images per source x label of the rows the model used."""
    used = manifest[manifest["rejected_reason"].isna()] if "rejected_reason" in manifest.columns else manifest
    by_split = {
        str(split): {"n_images": int(len(rows)), "n_patients": int(rows["patient_id"].nunique())}
        for split, rows in used.groupby("split")
    }
    table = used.groupby(["source", "label"]).size().unstack(fill_value=0)
    return {"splits": by_split, "images_by_source_label": {str(s): {str(k): int(v) for k, v in row.items()} for s, row in table.iterrows()}}


def _metadata(name: str, folder: Path, recipe: dict[str, Any], loso: bool) -> dict[str, Any]:
    from covidcxr.data.manifest import file_sha1
    from covidcxr.zoo import get

    run = RunDir(folder)
    audit = run.read_audit() or {}
    entry = get(name)
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {
        "name": name,
        "description": entry.description,
        "task": recipe["data"]["task"],
        "labels": list(run.read_recipe().classes),
        "resolution": list(run.read_recipe().preprocess.size),
        "architecture": recipe["model"]["name"],
        "operating_point": run.operating_point().to_dict(),
        "audit_verdict": audit.get("verdict"),
        "training_data": {"collection": recipe["data"]["collection"], **_training_data(run.read_manifest())},
        "recipe": entry.recipe,
        "reproduce": f"python -m covidcxr.zoo.package {entry.recipe} {name}" + (" --loso src/covidcxr/zoo/LOSO.md" if loso else ""),
        "weights_dtype": "float16 (cast to float32 when loaded)",
        "weights_sha1": file_sha1(run.best_checkpoint),
        "bytes": sizes,
        "bytes_total": int(sum(sizes.values())),
    }


def prepare_run(recipe_or_run: str | Path) -> Path:
    """A run directory ready to package: ``recipe_or_run`` trained (if a recipe), evaluated and audited where not yet."""
    from covidcxr.audit.run import audit_run
    from covidcxr.evaluate.cross_source import evaluate_run
    from covidcxr.train.recipe import load_recipe
    from covidcxr.train.run import train_recipe

    path = Path(recipe_or_run)
    run = RunDir(train_recipe(load_recipe(path), progress=False).run_dir if path.suffix in (".yaml", ".yml") else path)
    if not run.evaluation.is_file():
        evaluate_run(run.path)
    if not run.audit_file.is_file():
        audit_run(run.path)
    return run.path


def package_run(run_dir: str | Path, name: str, models_dir: str | Path | None = None, loso: Path | None = None, collection: str | None = "../shared/data/cxr") -> Path:
    """Package ``run_dir`` as the shipped model ``name``; returns its folder.

    Args:
        run_dir: a trained run, evaluated and audited.
        name: a registry name (`covidcxr.zoo.REGISTRY`).
        models_dir: where the folder goes (default: the package's `covidcxr.zoo.MODELS_DIR`).
        loso: a Markdown file with the leave-one-source-out results the card quotes (None: pending).
        collection: the training collection as the card, ``config.yaml`` and the manifest's paths
            name it (None: this machine's paths are kept).

    Raises:
        CovidCXRError: an unknown name, or a run that is not trained, evaluated and audited.
    """
    from covidcxr.evaluate.seen_prints import write_seen_fingerprints
    from covidcxr.zoo import MODELS_DIR, METADATA_FILE, get
    from covidcxr.zoo.card import write_card

    get(name)
    run = RunDir(run_dir)
    resolved = run.read_recipe().resolved()
    recipe = portable_recipe(resolved, collection)
    root = Path(models_dir) if models_dir is not None else MODELS_DIR
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _copy_read_side(run, folder, recipe)
        half_checkpoint(run.weights().checkpoints[0], RunDir(folder).best_checkpoint, recipe)
        _build_reference(folder)  # reads the training images: before their paths are made portable
        write_seen_fingerprints(folder)  # likewise: near-duplicates of them stay findable without the images
        _portable_paths(folder, run.path, resolved["data"].get("collection"), collection)
        metadata = _metadata(name, folder, recipe, loso is not None)
        atomic_write_text(folder / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
        write_card(folder, metadata, loso.read_text(encoding="utf-8") if loso is not None else None)
        folder.chmod(0o755)  # mkdtemp made it private; an installed package is readable by everyone
        final = root / name
        old = root / f".{name}-old"
        if final.exists():
            final.rename(old)
        folder.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m covidcxr.zoo.package", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the recipe (trained, evaluated and audited first where needed) or a run directory")
    parser.add_argument("name", help="the shipped name (covid, pneumonia)")
    parser.add_argument("--loso", type=Path, default=None, help="Markdown with the leave-one-source-out results the card quotes")
    parser.add_argument("--models-dir", type=Path, default=None, help="where to write (default: the package's zoo/models)")
    args = parser.parse_args(argv)
    folder = package_run(prepare_run(args.run), args.name, args.models_dir, args.loso)
    print(f"packaged {args.run} as {args.name!r} in {folder} ({json.loads((folder / 'zoo.json').read_text())['bytes_total'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
