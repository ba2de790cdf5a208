"""Someone else's classifier: an ONNX or TorchScript file described by a small ``MODEL.yaml``.

This module owns the ``MODEL.yaml`` contract (`ForeignModelSpec`) and runs the model it
describes (`ForeignModel`). ``covidcxr evaluate --model MODEL.yaml --data DIR``
(`covidcxr.evaluate.foreign`) and ``covidcxr audit --model MODEL.yaml --data DIR``
(`covidcxr.audit.external.audit_foreign`) are its users.

An image reaches the model in two steps:

1. covidcxr's own preprocessing (`covidcxr.preprocess.pipeline`) with the steps the YAML
   names under ``preprocess:`` (default: none — min-max stretch, no lung masking) and the
   model's input size (resize with padding, aspect kept): ``(H, W)`` float32 in [0, 1],
   with its lung mask in the same geometry (the audit needs it);
2. the model's input contract (``input:``): the grey image repeated to ``channels``, then
   mapped linearly from [0, 1] to ``range`` or standardised with ``mean``/``std``
   (per channel) — ``(N, C, H, W)`` float32.

The output (``output:``) is a probability or a logit; ``positive_index`` picks the positive
class' column (a single column is the positive class; two or more logits go through a
softmax). An optional ``embedding`` output feeds the audit's source probe.

**TorchScript runs code from the file** (like a pickle): ``torch.jit.load`` executes the
serialized program, so only load TorchScript files you trust. ONNX files are a graph of
standard operators run by onnxruntime.

Example ``MODEL.yaml``::

    name: my-model
    format: onnx            # or torchscript
    path: model.onnx        # relative to the YAML, inside its folder
    input: {height: 224, width: 224, channels: 1, range: [0, 1]}   # or mean: [...], std: [...]
    preprocess: {equalization: none, lungs: none}
    output: {kind: probability, positive_index: 0, positive_label: covid}

Example:
    >>> model = load_foreign_model("models/my-model.yaml")     # doctest: +SKIP
    >>> model.predict(images)                                  # (N,) probabilities  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.pipeline import PreprocessConfig, PreprocessConfigError

__all__ = ["FOREIGN_FORMATS", "ForeignModel", "ForeignModelSpec", "load_foreign_model", "read_foreign_spec"]

FOREIGN_FORMATS = ("onnx", "torchscript")

#: covidcxr preprocessing defaults for a foreign model: nothing it did not ask for
PREPROCESS_DEFAULTS = {"equalization": "none", "lungs": "none"}

_Side = Annotated[int, Field(ge=8, le=4096)]
_OutputRef = Annotated[int, Field(ge=0)] | str


class InputSpec(BaseModel):
    """The model's input contract: ``(N, channels, height, width)`` float32.

    Attributes:
        height, width: the input size (covidcxr resizes with padding to it).
        channels: 1 or 3 (the grey image repeated).
        range: ``[low, high]``: [0, 1] is mapped linearly onto it (default [0, 1]).
        mean, std: instead of ``range``: ``(x - mean) / std`` per channel, on [0, 1] pixels
            (one value, or one per channel).
        name: the ONNX input's name (default: its first input).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: _Side
    width: _Side
    channels: Literal[1, 3] = 1
    range: tuple[float, float] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    name: str | None = None

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_normalisation(self) -> "InputSpec":
        if self.range is not None and (self.mean is not None or self.std is not None):
            raise ValueError("give either range or mean/std, not both")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high; got {list(self.range)}")
        for field, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise ValueError(f"{field} needs 1 or {self.channels} values (channels); got {len(values)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive; got {self.std}")
        return self


class OutputSpec(BaseModel):
    """Which output holds the score, what it is, and which class is positive.

    Attributes:
        kind: ``probability`` (already in [0, 1]) or ``logit`` (sigmoid for one column,
            softmax over two or more).
        positive_index: the positive class' column (0 for a single-column output).
        positive_label: the collection's label the positive class is (target 1).
        negative_labels: the labels scored as negatives (default: every other label); images
            with a label in neither are left out and listed.
        name: the output holding the scores: an ONNX output name, a TorchScript dict key, or a
            position (default 0, the first output).
        embedding: an output holding a ``(N, D)`` embedding, for the audit's source probe
            (default: none — the probe then reads the scores).
        threshold: the decision threshold on the positive probability.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["probability", "logit"]
    positive_index: Annotated[int, Field(ge=0)] = 0
    positive_label: str = "covid"
    negative_labels: list[str] | None = None
    name: _OutputRef = 0
    embedding: _OutputRef | None = None
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


class ForeignModelSpec(BaseModel):
    """``MODEL.yaml``: an ONNX or TorchScript classifier and how to feed it (see the module docstring).

    Attributes:
        name: names the results folder (letters, digits, ``.``, ``_``, ``-``).
        format: ``onnx`` or ``torchscript``.
        path: the model file, relative to the YAML and inside the YAML's folder.
        input: `InputSpec`.
        preprocess: covidcxr preprocessing fields (`PreprocessConfig` without ``size``,
            which comes from ``input``); default ``{equalization: none, lungs: none}``.
        output: `OutputSpec`.
        training_manifest: a manifest (CSV or Parquet, relative to the YAML) of the images the
            model was trained or validated on: images of the evaluated collection linked to
            them (patient, file hash, near-duplicate) are excluded, and its sources are the
            *seen* ones. Without it nothing can be excluded, and the results say so.
        training_sources: the sources the model was trained on, when no manifest is given.
        description: free text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
    format: Literal["onnx", "torchscript"]
    path: str
    input: InputSpec
    preprocess: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec
    training_manifest: str | None = None
    training_sources: list[str] | None = None
    description: str = ""

    @model_validator(mode="after")
    def _preprocess_fields(self) -> "ForeignModelSpec":
        if "size" in self.preprocess:
            raise ValueError("field 'preprocess.size': the size is the model's; give it as input.height / input.width")
        if "cache_dir" in self.preprocess or "workers" in self.preprocess:
            raise ValueError("field 'preprocess': cache_dir and workers are options of the command (--cache-dir), not of the model")
        try:
            self.preprocess_config()
        except PreprocessConfigError as exc:
            raise ValueError(str(exc).removeprefix("preprocess: ").replace("field '", "field 'preprocess.")) from None
        if self.training_manifest and self.training_sources:
            raise ValueError("fields 'training_manifest' and 'training_sources': give one, not both (the manifest names its sources)")
        return self

    def preprocess_config(self) -> PreprocessConfig:
        """covidcxr's `PreprocessConfig` for this model: the named steps, at the model's input size."""
        fields = {**PREPROCESS_DEFAULTS, **self.preprocess, "size": (self.input.height, self.input.width)}
        return PreprocessConfig.from_mapping(fields, origin="preprocess")


def _field_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        got = f" (got {error['input']!r})" if error["type"] != "missing" and not isinstance(error.get("input"), dict) else ""
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"field '{where}': {message}{got}" if where else message)
    return "; ".join(lines)


def read_foreign_spec(path: str | Path) -> ForeignModelSpec:
    """Read and validate a ``MODEL.yaml``.

    Raises:
        CovidCXRError: unreadable file, not a mapping, or bad fields — each named with what was expected.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CovidCXRError(f"--model {path}: no such file (expected a MODEL.yaml describing an ONNX or TorchScript classifier)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CovidCXRError(f"--model {path}: not a readable YAML file ({exc})") from None
    if not isinstance(data, dict):
        raise CovidCXRError(f"--model {path}: expected a mapping with name, format, path, input, output; got {type(data).__name__}")
    try:
        return ForeignModelSpec.model_validate(data)
    except ValidationError as exc:
        raise CovidCXRError(f"--model {path}: {_field_errors(exc)}") from None


def _inside(base: Path, relative: str, field: str, yaml_path: Path) -> Path:
    """``relative`` resolved against ``base``; refused when it leaves ``base`` (``..``, absolute, symlink out)."""
    candidate = Path(relative)
    if candidate.is_absolute():
        raise CovidCXRError(f"--model {yaml_path}: field '{field}' is an absolute path ({relative}); expected a path relative to the YAML's folder")
    resolved = (base / candidate).resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise CovidCXRError(f"--model {yaml_path}: field '{field}' ({relative}) leads outside the YAML's folder {base}; keep the model beside its YAML")
    if not resolved.is_file():
        raise CovidCXRError(f"--model {yaml_path}: field '{field}': no file {resolved}")
    return resolved


class ForeignModel:
    """A loaded foreign classifier: covidcxr model inputs ``(N, H, W)`` in [0, 1] -> positive probabilities.

    Args:
        spec: the validated `ForeignModelSpec`.
        yaml_path: where the spec came from (relative paths resolve against its folder).
        threads: onnxruntime / torch intra-op threads (None: onnxruntime's default for this process).
    """

    def __init__(self, spec: ForeignModelSpec, yaml_path: str | Path, threads: int | None = None, batch_size: int = 32):
        self.spec = spec
        self.yaml_path = Path(yaml_path)
        self.model_path = _inside(self.yaml_path.parent, spec.path, "path", self.yaml_path)
        self.batch_size = batch_size
        self._session: Any = None
        self._module: Any = None
        if spec.format == "onnx":
            self._load_onnx(threads)
        else:
            self._load_torchscript()

    # ------------------------------------------------------------------ loading
    def _load_onnx(self, threads: int | None) -> None:
        from covidcxr.serve.engines import onnx_session

        self._session = onnx_session(self.model_path, threads)
        inputs = self._session.get_inputs()
        names = [i.name for i in inputs]
        wanted = self.spec.input.name or names[0]
        if wanted not in names:
            raise CovidCXRError(f"--model {self.yaml_path}: field 'input.name' is {wanted!r}; the ONNX file's inputs are {names}")
        self._input_name = wanted
        shape = next(i.shape for i in inputs if i.name == wanted)
        expected = (self.spec.input.channels, self.spec.input.height, self.spec.input.width)
        if len(shape) != 4:
            raise CovidCXRError(f"--model {self.yaml_path}: the ONNX input {wanted!r} has shape {shape}; expected (N, C, H, W)")
        for field, have, want in zip(("input.channels", "input.height", "input.width"), shape[1:], expected):
            if isinstance(have, int) and have != want:
                raise CovidCXRError(f"--model {self.yaml_path}: field '{field}' is {want}, but the ONNX input {wanted!r} has shape {shape}")
        self._fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self._output_names = [o.name for o in self._session.get_outputs()]
        for field, ref in (("output.name", self.spec.output.name), ("output.embedding", self.spec.output.embedding)):
            if ref is not None:
                self._output_position(ref, field)

    def _load_torchscript(self) -> None:
        import torch

        try:  # runs code from the file, like a pickle: documented, only for trusted files
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates torch.jit; TorchScript files still load
                module = torch.jit.load(str(self.model_path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise CovidCXRError(f"--model {self.yaml_path}: {self.model_path} is not a TorchScript file torch.jit.load can read ({str(exc).splitlines()[0]})") from None
        self._module = module.eval()
        self._fixed_batch = None
        self._output_names = []

    def _output_position(self, ref: int | str, field: str) -> int:
        if isinstance(ref, int):
            if ref >= len(self._output_names):
                raise CovidCXRError(f"--model {self.yaml_path}: field '{field}' is output #{ref}; the ONNX file has {len(self._output_names)} outputs {self._output_names}")
            return ref
        if ref not in self._output_names:
            raise CovidCXRError(f"--model {self.yaml_path}: field '{field}' is {ref!r}; the ONNX file's outputs are {self._output_names}")
        return self._output_names.index(ref)

    # ------------------------------------------------------------------ facts
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def threshold(self) -> float:
        return float(self.spec.output.threshold)

    @property
    def positive_label(self) -> str:
        return self.spec.output.positive_label

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.spec.input.height, self.spec.input.width)

    def preprocess_config(self) -> PreprocessConfig:
        return self.spec.preprocess_config()

    def fingerprint(self) -> str:
        """SHA-1 of the model file's bytes and the spec: a resumed evaluation reuses scores only of the same model."""
        digest = hashlib.sha1()
        with open(self.model_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(json.dumps(self.spec.model_dump(mode="json"), sort_keys=True).encode("utf-8"))
        return digest.hexdigest()

    def describe(self) -> str:
        contract = self.spec.input
        scale = f"range {list(contract.range or (0.0, 1.0))}" if contract.mean is None else f"mean {contract.mean}, std {contract.std}"
        return (f"foreign {self.spec.format} model {self.name} ({self.model_path.name}): input {contract.channels}x{contract.height}x{contract.width}, {scale}; "
                f"output {self.spec.output.kind} of {self.positive_label!r} (column {self.spec.output.positive_index})")

    # ------------------------------------------------------------------ running it
    def model_inputs(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` covidcxr inputs in [0, 1] -> ``(N, C, H, W)`` float32 per the input contract."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1:] != self.input_size:
            raise CovidCXRError(f"{self.name}: expected (N, {self.input_size[0]}, {self.input_size[1]}) images; got shape {images.shape}")
        contract = self.spec.input
        x = np.repeat(images[:, None], contract.channels, axis=1)
        if contract.mean is not None:
            mean = np.asarray(contract.mean, dtype=np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(contract.std, dtype=np.float32).reshape(1, -1, 1, 1)
            x = (x - mean) / std
        else:
            low, high = contract.range or (0.0, 1.0)
            x = x * np.float32(high - low) + np.float32(low)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _raw(self, batch: np.ndarray) -> list[np.ndarray]:
        """The model's outputs for one ``(B, C, H, W)`` batch, as a list in output order.

        Raises:
            CovidCXRError: the runtime refused the input (a dtype or shape the file does not take), naming the model.
        """
        try:
            return self._run(batch)
        except CovidCXRError:
            raise
        except Exception as exc:  # onnxruntime's and torch.jit's own error types (InvalidArgument, RuntimeError...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CovidCXRError(f"--model {self.yaml_path}: {self.model_path.name} refused a {batch.dtype} input of shape {batch.shape}: {first}") from None

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        if self._session is not None:
            if self._fixed_batch and len(batch) != self._fixed_batch:
                parts = [self._session.run(None, {self._input_name: batch[i : i + self._fixed_batch]}) for i in range(0, len(batch), self._fixed_batch)]
                return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))]
            return [np.asarray(o) for o in self._session.run(None, {self._input_name: batch})]
        import torch

        with torch.inference_mode():
            out = self._module(torch.from_numpy(batch))
        if isinstance(out, dict):
            self._output_names = list(out)
            return [np.asarray(v.detach().float().numpy()) for v in out.values()]
        if isinstance(out, (tuple, list)):
            self._output_names = [str(k) for k in range(len(out))]
            return [np.asarray(v.detach().float().numpy()) for v in out]
        self._output_names = ["0"]
        return [np.asarray(out.detach().float().numpy())]

    def _pick(self, outputs: list[np.ndarray], ref: int | str, field: str) -> np.ndarray:
        if isinstance(ref, str) and ref.isdigit() and ref not in self._output_names:
            ref = int(ref)
        position = self._output_position(ref, field)
        return outputs[position]

    def _positive_probability(self, scores: np.ndarray) -> np.ndarray:
        out = self.spec.output
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim == 1:
            scores = scores[:, None]
        if scores.ndim != 2:
            raise CovidCXRError(f"{self.name}: the score output has shape {scores.shape}; expected (N,) or (N, K)")
        if out.positive_index >= scores.shape[1]:
            raise CovidCXRError(f"{self.name}: field 'output.positive_index' is {out.positive_index}, but the score output has {scores.shape[1]} column(s)")
        if not np.isfinite(scores).all():
            raise CovidCXRError(f"{self.name}: the model returned NaN or infinite scores")
        if out.kind == "logit":
            if scores.shape[1] == 1:
                return 1.0 / (1.0 + np.exp(-scores[:, 0]))
            from scipy.special import softmax

            return softmax(scores, axis=1)[:, out.positive_index]
        column = scores[:, out.positive_index]
        if column.min() < -1e-6 or column.max() > 1 + 1e-6:
            raise CovidCXRError(f"{self.name}: field 'output.kind' is probability, but the model returned values in [{column.min():.3g}, {column.max():.3g}]; set kind: logit if these are logits")
        return np.clip(column, 0.0, 1.0)

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, H, W)`` model inputs in [0, 1] -> ``(positive probability (N,), embedding (N, D) or None)``."""
        x = self.model_inputs(images)
        probabilities, embeddings = [], []
        for start in range(0, len(x), self.batch_size):
            raw = self._raw(x[start : start + self.batch_size])
            probabilities.append(self._positive_probability(self._pick(raw, self.spec.output.name, "output.name")))
            if self.spec.output.embedding is not None:
                embedding = np.asarray(self._pick(raw, self.spec.output.embedding, "output.embedding"), dtype=np.float64)
                embeddings.append(embedding.reshape(len(embedding), -1))
        if not probabilities:
            return np.zeros(0), (np.zeros((0, 0)) if self.spec.output.embedding is not None else None)
        return np.concatenate(probabilities), (np.concatenate(embeddings) if embeddings else None)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(N,)`` probability of the positive class."""
        return self.outputs(images)[0]

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, D)``: the ``embedding`` output, else the positive probability as one feature."""
        probability, embedding = self.outputs(images)
        return embedding if embedding is not None else probability[:, None]


def load_foreign_model(path: str | Path, threads: int | None = None) -> ForeignModel:
    """Read a ``MODEL.yaml`` and load the model it describes (`ForeignModel`).

    Raises:
        CovidCXRError: a bad field, a model file outside the YAML's folder or missing, a file
            onnxruntime / torch.jit cannot load, an input shape that contradicts ``input:``.
    """
    return ForeignModel(read_foreign_spec(path), path, threads=threads)
