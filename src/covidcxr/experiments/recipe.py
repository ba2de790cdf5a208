"""Experiment recipes: one training recipe (the base point) plus a grid, scales and test sources.

An experiment recipe is a `TrainRecipe` YAML with one more top-level section,
``experiment:``. ``covidcxr train`` ignores that section and trains the base point;
``covidcxr experiment run`` expands it into grid points (`GridPoint`), one run each::

    name: tartaglione2020
    data: {collection: ../shared/data/cxr, sources: [cohen], ...}     # the base point
    model: {name: resnet18.tartaglione2020, pretrained: recipes/tartaglione2020_pretrain.yaml}
    ...
    experiment:
      grid:                           # axes; the grid is their product, in this order
        composition:                  # a named axis: label -> dotted overrides
          cohen: {data.sources: [cohen], data.negatives_from: []}
          cohen+kermany: {data.sources: [cohen], data.negatives_from: [kermany]}
        pretrain:
          none: {model.pretrained: null}
          kermany: {model.pretrained: recipes/tartaglione2020_pretrain.yaml, pretrain.data.sources: [kermany]}
        optimizer.lr: [1.0e-3, 1.0e-4]                    # a list axis: labels are the values
      scales:                         # named override sets: --set scale=small
        small: {preprocess.size: 64, train.epochs: 3, experiment.subset: {fraction: 0.5}}
      test_sources: all               # or [cohen, nih]: every run is tested on each
      subset: null                    # {fraction: 0.5, min_images: 40, max_images: null, seed: 0}: per (source, label)
      n_boot: 1000                    # patient-bootstrap resamples for the CIs
      only: {}                        # {axis: [labels]}: run part of the grid (a scale may set it)
      pretraining: {inherit: [model.name, model.in_channels, model.arch_kwargs, preprocess]}
      ensembles: []                   # axes whose runs are also averaged into one model (Hall et al.)
      adapt: null                     # local adaptation of chosen points (Ben Ahmed et al., Table 4)

Order of overrides for a grid point: base recipe <- axis values <- scale <- ``--set``
(so ``scale=small`` shrinks every point, and the command line wins). Keys starting with
``experiment.`` change this section, keys starting with ``pretrain.`` change the stage-1
(pretraining) recipe of the points that have one.

**Two-stage points.** When a point's ``model.pretrained`` names a recipe YAML (the
Tartaglione stage-1 pneumonia pretraining), the stage-1 recipe becomes a run of its own:
it takes the ``pretraining.inherit`` fields from the point (the architecture and the
preprocessing must match for the encoder to be reused), then the axis' ``pretrain.*``
overrides (``pretrain.*``: the stage-1 recipe's fields) and the scale; identical stage-1
recipes (same `run_identity`) are trained once and shared by every point that needs them.

**k-fold points.** A point with ``data.split.kind: kfold`` and no fold becomes one run per
fold (an implicit ``fold`` axis, last), so folds run in parallel and resume one by one;
the table pools them (out-of-fold predictions for seen sources, the fold models' average
for unseen ones).

**Adaptation runs** (``adapt:``, `AdaptSection`): a trained point fine-tuned on a few images
of sources it never saw, tested before and after on the rest of them.

Every run is named by `run_identity` (config hash and epochs): its store row and its folder
``<root>/<labels>-<identity[:8]>``, so an edited recipe makes new runs beside the old ones.

Example:
    >>> exp = load_experiment("recipes/tartaglione2020.yaml", ["scale=small"])   # doctest: +SKIP
    >>> [p.key for p in exp.points()][:1]                                         # doctest: +SKIP
    ['pretrain=none/composition=cohen/architecture=resnet18']
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidcxr.train.recipe import RecipeError, TrainRecipe, apply_overrides, read_recipe_yaml, recipe_from_mapping, resolve_paths, set_dotted

__all__ = [
    "AdaptRun",
    "AdaptSection",
    "AdaptSource",
    "adaptation_recipe",
    "EXPERIMENT_KEY",
    "ExperimentError",
    "ExperimentRecipe",
    "ExperimentSection",
    "GridPoint",
    "PretrainRun",
    "SubsetSection",
    "is_experiment_mapping",
    "load_experiment",
    "run_identity",
]

EXPERIMENT_KEY = "experiment"
PRETRAIN_PREFIX = "pretrain."
FOLD_AXIS = "fold"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")


class ExperimentError(RecipeError):
    """An experiment recipe (its ``experiment:`` section, a scale or an axis) is invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubsetSection(_Section):
    """A patient-grouped subset of the collection, so a grid runs in minutes on a CPU.

    Of each (source, label), about ``fraction`` of the images are kept, but at least
    ``min_images`` (or all there are) and at most ``max_images``; patients are drawn in a
    seeded random order and come with all their images of that label. Keeping a fraction
    (not a fixed count) keeps each source's class balance, which the compositions of
    Tartaglione et al.'s Table 1 depend on (a COVID source short of negatives borrows them).
    """

    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    min_images: Annotated[int, Field(ge=0)] = 0
    max_images: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _bounds(self) -> SubsetSection:
        if self.max_images is not None and self.max_images < self.min_images:
            raise ValueError(f"max_images ({self.max_images}) is below min_images ({self.min_images})")
        return self


class PretrainingSection(_Section):
    """Which fields a stage-1 (pretraining) run takes from its grid point."""

    inherit: list[str] = Field(default_factory=lambda: ["model.name", "model.in_channels", "model.arch_kwargs", "preprocess"])


class AdaptSource(_Section):
    """Where the adaptation images of one class come from, and how many."""

    source: str
    images: Annotated[int, Field(ge=2)] = 80


class AdaptSection(_Section):
    """Local adaptation (Ben Ahmed et al. 2021, §III and Table 4): fine-tune a trained point on
    a few images of sources it never saw, then test it before and after on the rest of them.

    points: ``{axis: [labels]}`` picks the points that get this stage (default: all).
    positives / negatives: the source and image count of each class (the paper: 80 COVID-19
    images of BIMCV and 80 pneumonia images of CheXpert, both unseen by the model).
    val_fraction: of the adaptation images, by patient, for validation.
    set: dotted overrides of the adaptation run (e.g. ``train.epochs``, ``optimizer.lr``).
    """

    points: dict[str, list[str]] = Field(default_factory=dict)
    positives: AdaptSource
    negatives: AdaptSource
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    seed: int = 0
    set: dict[str, Any] = Field(default_factory=dict)


class ExperimentSection(_Section):
    """The ``experiment:`` section (see the module docstring)."""

    description: str = ""
    grid: dict[str, dict[str, dict[str, Any] | None] | list[Any]] = Field(default_factory=dict)
    scales: dict[str, dict[str, Any]] = Field(default_factory=dict)
    test_sources: Literal["all"] | list[str] = "all"
    subset: SubsetSection | None = None
    n_boot: Annotated[int, Field(ge=0, le=100_000)] = 1000
    only: dict[str, list[str]] = Field(default_factory=dict)
    pretraining: PretrainingSection = Field(default_factory=PretrainingSection)
    ensembles: list[str] = Field(default_factory=list)
    #: decision threshold of the tables; None: each run's own operating point
    #: (`covidcxr.rundir.RunDir.threshold`, chosen on its validation split by the recipe's
    #: ``operating_point`` rule); a pooled row of several runs uses their common threshold,
    #: or, when they differ, their median (stated in the row's summary)
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    adapt: AdaptSection | None = None

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid: dict[str, Any]) -> dict[str, Any]:
        for axis, values in grid.items():
            if axis == FOLD_AXIS:
                raise ValueError(f"axis '{axis}' is reserved for the folds of a k-fold point")
            if isinstance(values, list):
                if not values:
                    raise ValueError(f"axis '{axis}' has no values")
                if "." not in axis and axis not in ("seed", "name"):
                    raise ValueError(f"list axis '{axis}' must be a dotted recipe field (e.g. optimizer.lr); use a named axis for labelled values")
                labels = [_value_label(v) for v in values]
                if len(set(labels)) != len(labels):
                    raise ValueError(f"axis '{axis}' repeats a value: {labels}")
            else:
                if not values:
                    raise ValueError(f"axis '{axis}' has no labelled values")
                for label, overrides in values.items():
                    if not _LABEL.match(str(label)):
                        raise ValueError(f"axis '{axis}': label {label!r} must be letters, digits and _ . + - (it names run folders)")
                    for key in overrides or {}:
                        if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
                            raise ValueError(f"axis '{axis}' label '{label}': {key!r} is not a dotted field name")
        return grid

    @field_validator("test_sources")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one source, or 'all'")
        return value


def _value_label(value: Any) -> str:
    """A list axis' value as a folder-safe label (``1e-3`` -> ``0.001``, ``[a, b]`` -> ``a+b``)."""
    if isinstance(value, (list, tuple)):
        text = "+".join(_value_label(v) for v in value) or "none"
    elif value is None:
        text = "none"
    elif isinstance(value, dict):
        text = hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9_.+\-]", "_", text)


def _format_errors(exc: ValidationError, prefix: str) -> tuple[str, list[str]]:
    lines, fields = [], []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
        where = f"{prefix}.{loc}" if loc else prefix
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field; known fields here: " + ", ".join(ExperimentSection.model_fields)
        fields.append(where)
        lines.append(f"experiment field '{where}': {message}")
    return "\n".join(lines), fields


def is_experiment_mapping(data: Any) -> bool:
    """True when a recipe mapping holds an ``experiment:`` section."""
    return isinstance(data, dict) and EXPERIMENT_KEY in data


def _get(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _parse_cli(overrides: list[str] | tuple[str, ...]) -> tuple[str | None, list[tuple[str, Any]]]:
    """``--set`` items -> (scale name, [(dotted key, parsed value)])."""
    scale: str | None = None
    pairs: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            raise ExperimentError(f"--set {item!r}: expected KEY=VALUE, e.g. scale=small or train.epochs=3", [item])
        key = item.split("=", 1)[0].strip()
        if key == "scale":
            scale = item.split("=", 1)[1].strip() or None
            continue
        # apply_overrides parses the value exactly as `covidcxr train --set` does
        parsed = apply_overrides({}, [f"__value={item.split('=', 1)[1]}"])["__value"]
        pairs.append((key, parsed))
    return scale, pairs


# ---------------------------------------------------------------------------------- points


def run_identity(recipe: TrainRecipe) -> str:
    """What names a grid run in the store and on disk: `TrainRecipe.config_hash` plus the epochs.

    ``config_hash`` leaves the epoch count out (so one run can be trained further); a grid
    run is one exact configuration, so asking for more epochs makes new runs, and the
    points that start from a stage-1 run change with it (their ``model.pretrained`` path
    holds this identity).
    """
    text = f"{recipe.config_hash()}:epochs={recipe.train.epochs}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _TrainsARecipe:
    """What every unit of a grid has: a validated recipe, its run directory and identity."""

    recipe: TrainRecipe

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir()

    @property
    def config_hash(self) -> str:
        """`run_identity` of the recipe (config hash and epochs)."""
        return run_identity(self.recipe)


@dataclass(frozen=True)
class PretrainRun(_TrainsARecipe):
    """A stage-1 (pretraining) run shared by the grid points that name the same recipe.

    Attributes:
        key: ``pretrain/<slug>`` (unique in the experiment).
        recipe: the validated stage-1 recipe (``output.run_dir`` set).
    """

    key: str
    recipe: TrainRecipe


@dataclass(frozen=True)
class GridPoint(_TrainsARecipe):
    """One run of the grid.

    Attributes:
        key: ``axis=label/axis=label...`` (stable across machines and reruns).
        labels: axis -> label, in axis order.
        recipe: the validated `TrainRecipe` of this point (``output.run_dir`` set; a
            stage-1 recipe in ``model.pretrained`` is replaced by that run's directory).
        pretrain: the stage-1 run this point starts from, if any.
    """

    key: str
    labels: dict[str, str]
    recipe: TrainRecipe
    pretrain: PretrainRun | None = None


@dataclass(frozen=True)
class AdaptRun(_TrainsARecipe):
    """The local-adaptation run of a trained point (`AdaptSection`).

    Attributes:
        key: ``<point key>/adapt``.
        point: the point it starts from (its ``best.ckpt`` initialises the network's backbone).
        recipe: the validated fine-tuning recipe: ``data.manifest`` is the adaptation
            manifest (train/val = the few images, test = the rest of those sources), written
            by the runner once the point is trained.
        spec: the experiment's `AdaptSection`.
    """

    key: str
    point: GridPoint
    recipe: TrainRecipe
    spec: AdaptSection

    @property
    def manifest_path(self) -> Path:
        return Path(str(self.recipe.data.manifest))


def adaptation_recipe(
    point_recipe: TrainRecipe,
    point_run_dir: str | Path,
    sources: list[str],
    overrides: dict[str, Any],
    manifest: str | Path,
    where: str,
) -> TrainRecipe:
    """The fine-tuning recipe of a local adaptation (Ben Ahmed et al. 2021, Table 4).

    The trained point's recipe, with: the data read from the adaptation ``manifest`` (its
    own ``split`` column: train/val = the few adaptation images, test = the rest of those
    sources), the adaptation ``sources``, no borrowing or balancing, the network
    initialised from the point's run (``model.pretrained``: its backbone), and the dotted
    ``overrides`` (``experiment.adapt.set``, ``covidcxr adapt --set``). Used by the
    experiment grid (`ExperimentRecipe.adapt_runs`) and ``covidcxr adapt --labels N``
    (`covidcxr.adapt`).

    Raises:
        RecipeError: an override is not a recipe field (``where`` names it).
    """
    data = point_recipe.resolved()
    data["data"].pop("collection", None)
    data["data"].pop("synthetic", None)
    data["data"].update({
        "sources": list(sources),
        "negatives_from": [],
        "balance": "none",
        "split": {**data["data"]["split"], "kind": "given", "fold": None},
    })
    data["model"]["pretrained"] = str(point_run_dir)
    for key, value in overrides.items():
        set_dotted(data, key, value, origin=f"{where} (override '{key}')")
    data["data"]["manifest"] = str(manifest)
    return recipe_from_mapping(data, origin=where)


@dataclass
class ExperimentRecipe:
    """A loaded, validated experiment recipe (see the module docstring).

    Attributes:
        name: the experiment's name (``name:`` of the recipe, else the file's stem).
        scale: the chosen scale (None: the recipe as written).
        path: the recipe file.
        section: the validated ``experiment:`` section (after the scale and ``--set``).
        raw: the recipe's TrainRecipe fields as written (paths resolved), before any
            axis, scale or ``--set``.
        root: the folder holding this experiment's run directories.
        scale_overrides: the scale's dotted overrides of every point (and stage-1 run).
        cli_overrides: ``--set``'s dotted overrides of every point.
        pretrain_overrides: ``pretrain.*`` overrides (scale, then ``--set``) of stage-1 runs.
        engine_overrides: ``--set engine.*`` items, applied to stage-1 runs too.
        base_dir: where relative paths resolve.
    """

    name: str
    scale: str | None
    path: Path | None
    section: ExperimentSection
    raw: dict[str, Any]
    root: Path
    scale_overrides: list[tuple[str, Any]] = field(default_factory=list)
    cli_overrides: list[tuple[str, Any]] = field(default_factory=list)
    pretrain_overrides: list[tuple[str, Any]] = field(default_factory=list)
    engine_overrides: list[tuple[str, Any]] = field(default_factory=list)
    base_dir: Path = field(default_factory=Path.cwd)
    subsets: dict[str, str] = field(default_factory=dict)
    _points: list[GridPoint] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``name`` or ``name@scale``: how the run store names this experiment."""
        return f"{self.name}@{self.scale}" if self.scale else self.name

    @property
    def recipe_overrides(self) -> list[tuple[str, Any]]:
        """The scale's, then ``--set``'s overrides (applied to every point after its axis values)."""
        return [*self.scale_overrides, *self.cli_overrides]

    @property
    def origin(self) -> str:
        return str(self.path or self.name)

    def base_mapping(self) -> dict[str, Any]:
        """The base point: the recipe's fields <- scale <- ``--set`` (what ``covidcxr train`` trains)."""
        data = copy.deepcopy(self.raw)
        for key, value in self.recipe_overrides:
            set_dotted(data, key, value, origin=f"{self.origin}: override '{key}'")
        resolve_paths(data, self.base_dir)
        return data

    @property
    def base_recipe(self) -> TrainRecipe:
        return recipe_from_mapping(self.base_mapping(), origin=f"{self.origin} (base point)")

    @property
    def axes(self) -> list[str]:
        return list(self.section.grid)

    def axis_labels(self, axis: str) -> list[str]:
        """The labels of one axis, after ``only`` (the fold axis: the fold numbers)."""
        if axis == FOLD_AXIS:
            return sorted({p.labels[FOLD_AXIS] for p in self.points() if FOLD_AXIS in p.labels}, key=int)
        return [label for label, _ in self._axis_items(axis)]

    def subset_manifest_path(self, collection: str) -> Path:
        """Where the subset manifest of ``collection`` lives (named by its parameters)."""
        assert self.section.subset is not None
        spec = {"collection": str(Path(collection).resolve()), **self.section.subset.model_dump()}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        return self.root / f"subset-{digest}.csv"

    # ------------------------------------------------------------------ expansion
    def points(self) -> list[GridPoint]:
        """Every grid point (k-fold points split into folds), in axis order."""
        if self._points is None:
            self._points = self._expand()
        return self._points

    def pretrain_runs(self) -> list[PretrainRun]:
        """The distinct stage-1 runs the points need (each trained once)."""
        seen: dict[str, PretrainRun] = {}
        for point in self.points():
            if point.pretrain is not None:
                seen.setdefault(point.pretrain.key, point.pretrain)
        return list(seen.values())

    def adapt_runs(self) -> list[AdaptRun]:
        """The local-adaptation runs (`AdaptSection`), one per selected point, in grid order."""
        spec = self.section.adapt
        if spec is None:
            return []
        for axis, labels in spec.points.items():
            if axis not in self.section.grid:
                raise ExperimentError(f"{self.origin}: experiment field 'experiment.adapt.points.{axis}': no such axis; the grid has {self.axes}", [f"experiment.adapt.points.{axis}"])
            unknown = sorted(set(labels) - set(self.axis_labels(axis)))
            if unknown:
                raise ExperimentError(f"{self.origin}: experiment field 'experiment.adapt.points.{axis}': unknown label(s) {unknown}", [f"experiment.adapt.points.{axis}"])
        runs = []
        for point in self.points():
            if any(point.labels.get(axis) not in labels for axis, labels in spec.points.items()):
                continue
            where = f"{self.origin} adaptation of point {point.key}"
            if FOLD_AXIS in point.labels:
                raise ExperimentError(f"{where}: adaptation starts from one trained model; a k-fold point has one per fold (pick a holdout point in experiment.adapt.points)", ["experiment.adapt.points"])
            folder = self.root / "adapt" / _clean(point.run_dir.name)
            recipe = adaptation_recipe(
                point.recipe, point.run_dir, [spec.positives.source, spec.negatives.source], spec.set, folder / "adapt-manifest.csv", f"{where} (experiment.adapt.set)"
            )
            digest = run_identity(recipe)[:8]
            recipe = recipe.with_updates({"output.run_dir": str(self.root / "adapt" / f"{_clean(point.run_dir.name)}-{digest}"), "name": f"{self.name}.{_slug(point.labels)}.adapt"})
            runs.append(AdaptRun(key=f"{point.key}/adapt", point=point, recipe=recipe, spec=spec))
        return runs

    def _axis_items(self, axis: str) -> list[tuple[str, dict[str, Any]]]:
        values = self.section.grid[axis]
        if isinstance(values, list):
            items = [(_value_label(v), {axis: v}) for v in values]
        else:
            items = [(str(label), dict(overrides or {})) for label, overrides in values.items()]
        keep = self.section.only.get(axis)
        if keep is not None:
            unknown = sorted(set(keep) - {label for label, _ in items})
            if unknown:
                raise ExperimentError(
                    f"{self.origin}: experiment field 'experiment.only.{axis}': unknown label(s) {unknown}; "
                    f"axis '{axis}' has {[label for label, _ in items]}",
                    [f"experiment.only.{axis}"],
                )
            items = [(label, o) for label, o in items if label in keep]
        return items

    def _expand(self) -> list[GridPoint]:
        for axis in self.section.only:
            if axis not in self.section.grid:
                raise ExperimentError(f"{self.origin}: experiment field 'experiment.only.{axis}': no such axis; the grid has {self.axes}", [f"experiment.only.{axis}"])
        axes = [(axis, self._axis_items(axis)) for axis in self.axes]
        points: list[GridPoint] = []
        stage_ones: dict[str, PretrainRun] = {}
        for combo in itertools.product(*[items for _, items in axes]):
            labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
            where = f"{self.origin} point {_key(labels) or '(base)'}"
            data = copy.deepcopy(self.raw)
            pretrain_pairs: list[tuple[str, Any]] = []
            for (axis, _), (label, overrides) in zip(axes, combo):
                for key, value in overrides.items():
                    if key.startswith(PRETRAIN_PREFIX):
                        pretrain_pairs.append((key[len(PRETRAIN_PREFIX) :], value))
                    else:
                        set_dotted(data, key, value, origin=f"{self.origin}: axis '{axis}' label '{label}'")
            for key, value in self.recipe_overrides:
                set_dotted(data, key, value, origin=f"{self.origin}: override '{key}'")
            resolve_paths(data, self.base_dir)
            point_recipe = recipe_from_mapping(copy.deepcopy(data), origin=where)
            pretrain = None
            pretrained = point_recipe.model.pretrained
            if pretrained and Path(pretrained).suffix.lower() in (".yaml", ".yml"):
                pretrain = self._stage_one(Path(pretrained), data, pretrain_pairs, where)
                pretrain = stage_ones.setdefault(pretrain.key, pretrain)
                set_dotted(data, "model.pretrained", str(pretrain.run_dir), origin=where)
            elif pretrain_pairs:
                raise ExperimentError(
                    f"{where}: pretrain.* overrides ({[k for k, _ in pretrain_pairs]}) but model.pretrained is "
                    f"{pretrained!r}, not a stage-1 recipe YAML",
                    ["model.pretrained"],
                )
            folds: list[int | None] = [None]
            if point_recipe.data.split.kind == "kfold" and point_recipe.data.split.fold is None:
                folds = list(range(point_recipe.data.split.folds))
            self._apply_subset(data)
            for fold in folds:
                fold_labels = dict(labels)
                fold_data = copy.deepcopy(data)
                if fold is not None:
                    fold_labels[FOLD_AXIS] = str(fold)
                    set_dotted(fold_data, "data.split.fold", fold, origin=where)
                recipe = recipe_from_mapping(fold_data, origin=where)
                slug = _slug(fold_labels) or "base"
                run_dir = self.root / f"{slug}-{run_identity(recipe)[:8]}"
                recipe = recipe.with_updates({"output.run_dir": str(run_dir), "name": f"{self.name}.{slug}"})
                points.append(GridPoint(key=_key(fold_labels) or "base", labels=fold_labels, recipe=recipe, pretrain=pretrain))
        return points

    def _stage_one(self, path: Path, point_data: dict[str, Any], pairs: list[tuple[str, Any]], where: str) -> PretrainRun:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ExperimentError(f"{where}: model.pretrained names the recipe {path}, which cannot be read ({exc.strerror or exc})", ["model.pretrained"]) from None
        except yaml.YAMLError as exc:
            raise ExperimentError(f"{where}: stage-1 recipe {path} is not valid YAML: {exc}", ["model.pretrained"]) from None
        if not isinstance(raw, dict):
            raise ExperimentError(f"{where}: stage-1 recipe {path} is not a mapping", ["model.pretrained"])
        raw.pop(EXPERIMENT_KEY, None)
        raw.setdefault("name", path.stem)
        origin = f"{where}, stage-1 recipe {path.name}"
        resolve_paths(raw, self.base_dir)
        for key in self.section.pretraining.inherit:
            found, value = _get(point_data, key)
            if found:
                set_dotted(raw, key, value, origin=f"{origin} (inherit '{key}')")
        for key, value in [*self.scale_overrides, *pairs, *self.pretrain_overrides, *self.engine_overrides]:
            set_dotted(raw, key, value, origin=f"{origin} ('{key}')")
        resolve_paths(raw, self.base_dir)
        recipe = recipe_from_mapping(copy.deepcopy(raw), origin=origin)
        if recipe.model.pretrained and Path(recipe.model.pretrained).suffix.lower() in (".yaml", ".yml"):
            raise ExperimentError(f"{origin}: names another recipe in model.pretrained; one stage of pretraining is supported", ["model.pretrained"])
        self._apply_subset(raw)
        recipe = recipe_from_mapping(raw, origin=origin)
        sources = "+".join(recipe.data.sources) or "all"
        model = recipe.model.name.split(".")[0]
        slug = _clean(f"{recipe.name}-{sources}-{model}")
        digest = run_identity(recipe)[:8]
        recipe = recipe.with_updates({"output.run_dir": str(self.root / "pretrain" / f"{slug}-{digest}")})
        return PretrainRun(key=f"pretrain/{slug}-{digest}", recipe=recipe)

    def _apply_subset(self, data: dict[str, Any]) -> None:
        """Point ``data.collection`` at the subset manifest (written by the runner before training)."""
        subset = self.section.subset
        section = data.get("data")
        if subset is None or not isinstance(section, dict) or not section.get("collection"):
            return
        collection = section.pop("collection")
        target = self.subset_manifest_path(collection)
        section["manifest"] = str(target)
        self.subsets[str(target)] = collection



def _key(labels: dict[str, str]) -> str:
    return "/".join(f"{axis}={label}" for axis, label in labels.items())


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+\-]", "_", text)


def _slug(labels: dict[str, str]) -> str:
    parts = [f"fold{label}" if axis == FOLD_AXIS else label for axis, label in labels.items()]
    return _clean("__".join(parts))


# ---------------------------------------------------------------------------------- loading


def load_experiment(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    base_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
) -> ExperimentRecipe:
    """Read and validate an experiment recipe.

    Args:
        path: the recipe YAML (a `TrainRecipe` with an ``experiment:`` section).
        overrides: ``--set`` items: ``scale=NAME`` picks a scale; ``experiment.*`` keys
            change the experiment section, ``pretrain.*`` the stage-1 recipes, anything
            else every grid point (``engine.devices=2``).
        base_dir: relative paths resolve against it (default: the current directory).
        runs_dir: where the experiment's folder goes (default: the recipe's
            ``output.runs_dir``); the folder is ``<runs_dir>/<name>[-<scale>]``.

    Raises:
        ExperimentError: no ``experiment:`` section, an unknown scale, a bad axis or field
            (the message names the field, the axis and the label).
        RecipeError: the base point or a grid point is not a valid `TrainRecipe`.
    """
    path = Path(path)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    raw = read_recipe_yaml(path, ExperimentError)
    if not is_experiment_mapping(raw):
        raise ExperimentError(
            f"{path}: not an experiment recipe (no top-level 'experiment:' section with a grid); "
            f"train a single recipe with `covidcxr train {path}`"
        )
    scale, cli = _parse_cli(list(overrides))
    section_raw = raw.pop(EXPERIMENT_KEY) or {}
    if not isinstance(section_raw, dict):
        raise ExperimentError(f"{path}: 'experiment:' must be a mapping, got {type(section_raw).__name__}", [EXPERIMENT_KEY])
    scales = section_raw.get("scales") or {}
    if not isinstance(scales, dict):
        raise ExperimentError(f"{path}: experiment field 'experiment.scales' must map names to override sets", ["experiment.scales"])
    scale_pairs: list[tuple[str, Any]] = []
    if scale is not None:
        if scale not in scales:
            raise ExperimentError(f"{path}: scale {scale!r} is not defined; experiment.scales has {sorted(scales) or 'none'}", ["scale"])
        chosen = scales[scale] or {}
        if not isinstance(chosen, dict):
            raise ExperimentError(f"{path}: experiment field 'experiment.scales.{scale}' must be a mapping of dotted fields to values", [f"experiment.scales.{scale}"])
        scale_pairs = list(chosen.items())
    section_data = {EXPERIMENT_KEY: copy.deepcopy(section_raw)}
    recipe_scale: list[tuple[str, Any]] = []
    recipe_cli: list[tuple[str, Any]] = []
    pretrain_scale: list[tuple[str, Any]] = []
    pretrain_cli: list[tuple[str, Any]] = []
    for origin, pairs, recipe_target, pretrain_target in (
        (f"scale '{scale}'", scale_pairs, recipe_scale, pretrain_scale),
        ("--set", cli, recipe_cli, pretrain_cli),
    ):
        for key, value in pairs:
            if not isinstance(key, str) or not key:
                raise ExperimentError(f"{path}: {origin}: {key!r} is not a dotted field name", [str(key)])
            if key.startswith(EXPERIMENT_KEY + "."):
                set_dotted(section_data, key, value, origin=f"{path}: {origin}")
            elif key.startswith(PRETRAIN_PREFIX):
                # pretrain.* keys change stage-1 runs only; other keys change both stages
                pretrain_target.append((key[len(PRETRAIN_PREFIX) :], value))
            else:
                recipe_target.append((key, value))
    try:
        section = ExperimentSection.model_validate(section_data[EXPERIMENT_KEY])
    except ValidationError as exc:
        message, fields = _format_errors(exc, EXPERIMENT_KEY)
        raise ExperimentError(f"{path}: {message}", fields) from None

    raw.setdefault("name", path.stem)
    resolve_paths(raw, base)
    name = str(raw.get("name") or path.stem)
    runs_root = Path(runs_dir) if runs_dir is not None else Path(raw["output"]["runs_dir"])
    if not runs_root.is_absolute():
        runs_root = (base / runs_root).resolve()
    experiment = ExperimentRecipe(
        name=name,
        scale=scale,
        path=path,
        section=section,
        raw=raw,
        root=runs_root / (f"{name}-{scale}" if scale else name),
        scale_overrides=recipe_scale,
        cli_overrides=recipe_cli,
        pretrain_overrides=[*pretrain_scale, *pretrain_cli],
        engine_overrides=[(k, v) for k, v in recipe_cli if k.startswith("engine.")],
        base_dir=base,
    )
    experiment.base_recipe  # noqa: B018 - validates the base point now (errors name the field)
    return experiment


def recipe_json_schema(kind: Literal["train", "experiment"] = "experiment") -> dict[str, Any]:
    """The JSON Schema of a recipe file, for editors (YAML language servers) and validators.

    Args:
        kind: ``"train"`` for a plain training recipe (what ``covidcxr train`` reads) or
            ``"experiment"`` for an experiment recipe (the same fields plus the
            ``experiment:`` section, what ``covidcxr experiment run`` reads).

    Returns:
        A JSON Schema (draft 2020-12, as pydantic writes it) as a dict.

    Example:
        >>> schema = recipe_json_schema("train")
        >>> "data" in schema["required"]
        True
    """
    if kind not in ("train", "experiment"):
        raise ExperimentError(f"recipe schema kind: expected 'train' or 'experiment', got {kind!r}")
    schema = TrainRecipe.model_json_schema()
    schema["title"] = "covidcxr training recipe"
    if kind == "experiment":
        section = ExperimentSection.model_json_schema()
        defs = schema.setdefault("$defs", {})
        defs.update(section.pop("$defs", {}))
        defs["ExperimentSection"] = section
        schema["properties"]["experiment"] = {"$ref": "#/$defs/ExperimentSection"}
        schema["title"] = "covidcxr experiment recipe"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
