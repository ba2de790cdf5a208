"""Shipped models: real-data classifiers packaged with covidcxr, selected by name (``--model covid``).

A registry in the style of torchxrayvision's ``xrv.models.model_urls`` and timm's
``list_models``/``create_model``, without any download: each shipped model **is a run
directory** inside the package (``covidcxr/zoo/models/<name>/``), read through
`covidcxr.rundir.RunDir` like any run, so predict, serve, evaluate, audit, export and adapt
need no special case beyond resolving the name (`resolve`). The folder holds what the
read-side of a run needs and nothing that has to be written:

* ``config.yaml``, ``manifest.parquet`` (what the model saw, for excluding linked images
  elsewhere), ``predictions.parquet``, ``metrics.json``, ``evaluation.json``,
  ``operating_point.json``, ``audit/audit.json``;
* ``checkpoints/best.ckpt``: the weights in **float16** (half the bytes; they are cast back
  to float32 when loaded, `covidcxr.train.module.load_checkpoint_model`);
* ``inference/reference.npz``: the out-of-distribution reference, built at packaging time
  for these very weights, so predict/serve never build (or write) it;
* ``zoo.json`` (labels, resolution, threshold, audit verdict, training data) and
  ``MODEL_CARD.md``.

Loading works from a read-only ``site-packages``: nothing takes a lock or writes there.
Commands that write results next to a run (``evaluate --data``, ``audit``, ``export``,
``adapt``) work on a **working copy** under ``runs/`` (`working_copy`), so the package
stays untouched. `covidcxr.zoo.package` makes a shipped model from a trained run.

Example:
    >>> from covidcxr import zoo
    >>> zoo.list_models()
    ['covid', 'pneumonia']
    >>> zoo.resolve(None).name                       # doctest: +SKIP
    'covid'
    >>> zoo.is_shipped("pneumonia"), zoo.is_shipped("mine.yaml")
    (True, False)
    >>> zoo.get("covid").labels                      # doctest: +SKIP
    ['rest', 'covid']
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path

__all__ = ["DEFAULT_MODEL", "MODELS_DIR", "REGISTRY", "ShippedModel", "get", "is_shipped", "list_models", "resolve", "select", "shipped_name", "working_copy"]

#: Where the packaged run folders live (inside the installed package).
MODELS_DIR = Path(__file__).resolve().parent / "models"
#: The model predict and serve use when neither ``--run`` nor ``--model`` is given.
DEFAULT_MODEL = "covid"
#: The metadata file of a packaged model (written by `covidcxr.zoo.package`).
METADATA_FILE = "zoo.json"
CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True)
class ShippedModel:
    """One registry entry: a name, what it decides, the recipe that trains it, its folder.

    Attributes:
        name: the ``--model`` name.
        task: the recipe task (``covid_vs_rest``, ``pneumonia_vs_normal``).
        description: one line for people.
        recipe: the training recipe, relative to the repository root.
        folder: the packaged run directory.
    """

    name: str
    task: str
    description: str
    recipe: str
    folder: Path

    @property
    def available(self) -> bool:
        """True when the packaged folder holds its weights (a source checkout may lack them)."""
        return (self.folder / "checkpoints" / "best.ckpt").is_file() and (self.folder / METADATA_FILE).is_file()

    @property
    def card(self) -> Path:
        return self.folder / CARD_FILE

    def metadata(self) -> dict[str, Any]:
        """``zoo.json``: labels, resolution, threshold, audit verdict, training data, weights SHA-1.

        Raises:
            CovidCXRError: the model is not packaged in this installation, or its metadata is unreadable.
        """
        path = self.folder / METADATA_FILE
        if not self.available:
            raise CovidCXRError(
                f"the shipped model {self.name!r} is not in this installation (expected {self.folder}/checkpoints/best.ckpt "
                f"and {METADATA_FILE}); reproduce it with `python -m covidcxr.zoo.package {self.recipe} {self.name}`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CovidCXRError(f"{path}: unreadable shipped-model metadata ({exc})") from None
        if not isinstance(data, dict):
            raise CovidCXRError(f"{path}: expected a JSON object of shipped-model metadata")
        return data

    @property
    def labels(self) -> list[str]:
        """Class names in output order (``[negative, positive]``)."""
        return list(self.metadata()["labels"])

    @property
    def resolution(self) -> list[int]:
        return list(self.metadata()["resolution"])

    @property
    def threshold(self) -> float:
        return float(self.metadata()["operating_point"]["threshold"])

    @property
    def verdict(self) -> str | None:
        return self.metadata().get("audit_verdict")


def _entry(name: str, task: str, description: str) -> ShippedModel:
    return ShippedModel(name, task, description, f"recipes/shipped_{name}.yaml", MODELS_DIR / name)


#: name -> shipped model. One owner of the names: CLIs and the service read them here.
REGISTRY: dict[str, ShippedModel] = {
    "covid": _entry("covid", "covid_vs_rest", "COVID-19 vs rest (every other label), a small CNN at 128 px, trained on the whole shared collection"),
    "pneumonia": _entry("pneumonia", "pneumonia_vs_normal", "pneumonia vs normal, a small CNN at 128 px, trained on the whole shared collection"),
}


def list_models() -> list[str]:
    """The shipped names (packaged in this installation or not)."""
    return sorted(REGISTRY)


def is_shipped(value: str | Path | None) -> bool:
    """True when ``value`` (a ``--model`` argument) names a shipped model rather than a file."""
    return value is not None and str(value) in REGISTRY


def get(name: str) -> ShippedModel:
    """The registry entry of ``name``.

    Raises:
        CovidCXRError: an unknown name (the message lists the shipped ones).
    """
    if name not in REGISTRY:
        raise CovidCXRError(f"--model {name!r}: not a shipped model (shipped: {', '.join(list_models())}); a foreign model is given as a YAML file")
    return REGISTRY[name]


def resolve(name_or_none: str | None = None) -> Path:
    """The packaged run directory of a shipped model (None: `DEFAULT_MODEL`), read-only.

    Shared by every command that accepts ``--model``: a shipped name resolves here; anything
    else is for the caller (e.g. a foreign model's YAML).

    Raises:
        CovidCXRError: an unknown name, or a model not packaged in this installation.
    """
    model = get(DEFAULT_MODEL if name_or_none is None else str(name_or_none))
    model.metadata()  # raises, with how to reproduce it, when the weights are absent
    return model.folder


def shipped_name(run_dir: str | Path) -> str | None:
    """The shipped name when ``run_dir`` is a packaged model's folder, else None."""
    try:
        target = Path(run_dir).resolve()
    except OSError:
        return None
    return next((m.name for m in REGISTRY.values() if m.folder == target), None)


def working_copy(name: str, runs_dir: str | Path = "runs") -> Path:
    """A writable copy of a shipped model, ``<runs_dir>/shipped-<name>/``, for commands that write.

    ``evaluate --data``, ``audit``, ``export`` and ``adapt`` write next to the run; a shipped
    model's folder may be read-only (``site-packages``) and is never written. The copy is
    made once (atomically: a temporary folder renamed into place) and reused while its
    weights are the package's, so earlier evaluations and audits stay with it.

    Raises:
        CovidCXRError: an unknown or absent model, or a folder there that holds other weights.
    """
    source = resolve(name)
    weights_sha1 = get(name).metadata().get("weights_sha1")
    target = Path(runs_dir) / f"shipped-{name}"
    if target.exists():
        meta = target / METADATA_FILE
        try:
            copied = json.loads(meta.read_text(encoding="utf-8")).get("weights_sha1")
        except (OSError, ValueError):
            copied = None
        if copied != weights_sha1:
            raise CovidCXRError(
                f"{target}: holds something other than the shipped model {name!r} of this installation "
                f"(weights {copied} vs {weights_sha1}); move it aside to make a fresh working copy"
            )
        _add_missing_files(source, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".shipped-{name}-", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        for path in [tmp, *tmp.rglob("*")]:  # a copy of a read-only install must be writable
            path.chmod(path.stat().st_mode | 0o200)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CovidCXRError(f"{target}: cannot make a working copy of the shipped model {name!r} ({exc})") from None
    return target


def _add_missing_files(source: Path, target: Path) -> None:
    """Files of the shipped model a working copy made by an older installation lacks (e.g. its
    ``inference/seen_fingerprints.npz``), copied in; nothing the copy already has is touched."""
    for path in source.rglob("*"):
        copy = target / path.relative_to(source)
        if path.is_file() and not copy.exists():
            try:
                copy.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(copy) as tmp:
                    shutil.copyfile(path, tmp)
            except OSError as exc:
                raise CovidCXRError(f"{target}: cannot add {path.name} of the shipped model to this working copy ({exc})") from None


def select(run: str | Path | None, model: str | None, writable: bool = False, default: bool = True) -> tuple[Path, str | None]:
    """The run a command works on, from its ``--run``/RUN and ``--model`` arguments, and a sentence saying which.

    Args:
        run: the run directory given, if any.
        model: a shipped name given with ``--model``, if any.
        writable: the command writes next to the run (evaluate, audit, export, adapt): a shipped
            model is then its `working_copy` under ``runs/``.
        default: with neither, use `DEFAULT_MODEL` (predict, serve); False: an error.

    Returns:
        ``(run_dir, said)``: ``said`` is None for a run given by path, else one line naming the
        shipped model and why it was chosen (print it; the service shows it on its page, so
        it holds no path unless ``writable``).

    Raises:
        CovidCXRError: both given, neither (with ``default=False``), an unknown or absent model.

    Example:
        >>> select(None, None)[1]                                       # doctest: +SKIP
        "no --run or --model given: the shipped model 'covid' (COVID-19 vs rest, ...)"
    """
    if run is not None and model is not None:
        raise CovidCXRError(f"give a run directory ({run}) or --model {model}, not both")
    if run is not None:
        return Path(run), None
    if model is None and not default:
        raise CovidCXRError(f"give a run directory or --model NAME (shipped: {', '.join(list_models())})")
    entry = get(DEFAULT_MODEL if model is None else str(model))
    folder = working_copy(entry.name) if writable else resolve(entry.name)
    why = f"--model {entry.name}" if model is not None else "no --run or --model given"
    where = f"; results are written to its working copy {folder}" if writable else ""
    return folder, f"{why}: the shipped model {entry.name!r} ({entry.description}){where}"
