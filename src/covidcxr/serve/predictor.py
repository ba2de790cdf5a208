"""One image in, one explained prediction out: the `Predictor` behind ``covidcxr predict`` and the service.

The steps, for a file (an upload is first written to a private temporary file whose name
the client never chooses):

1. **screen** (`covidcxr.preprocess.screening.inspect_input`): content sniffing, the pixel limit
   before decoding, refusal of what is plainly not a chest radiograph, early warnings;
2. **preprocess** with the run's own `PreprocessConfig` through
   `covidcxr.preprocess.pipeline.preprocess_batch` — the code path training used (read →
   downscale to the working resolution → equalise → segment → mask/crop → resize; a
   2,000-px film costs about what a 256-px one does). One change: ``mask_source`` is ``"model"``,
   because an upload has no manifest mask (a run trained on the phantoms' exact masks
   gets the U-Net's here; the out-of-distribution reference is built the same way);
3. **classify**: probabilities and the pooled embedding from one forward pass, on
   PyTorch or onnxruntime (`covidcxr.serve.engines`);
4. **explain** (optional): Grad-CAM (`covidcxr.audit.saliency.gradcam`, always PyTorch)
   and its lung-focus fraction;
5. **judge**: warnings for a rejected or implausible segmentation, a lateral view, an
   image far from the training distribution (`covidcxr.serve.reference`), saliency
   concentrated outside the lungs, and — on every prediction — a model whose audit
   (``RUN/audit/audit.json``) found no skill or shortcuts, or that was never audited; overlays as PNG;
6. **abstain**: the decision is ``"abstain"`` when one of those warnings is in `ABSTAIN_CODES`
   (out of distribution, lateral view, segmentation rejected or implausible, model with no
   skill / a shortcut / no audit); the probability and ``model_decision`` stay in the answer,
   marked not to be acted on. ``abstain=False`` (``--no-abstain``) is for research only.

Which run: the one named, else the shipped ``covid`` model (`covidcxr.zoo.resolve`; the CLI
says so, and the model card's ``selected`` field carries the sentence to the page).
`default_run` still finds the newest run directory under `DEFAULT_RUN_ROOTS` for callers that
want it.

Example:
    >>> predictor = Predictor.load("runs/demo")                              # doctest: +SKIP
    >>> result = predictor.predict_file("cxr.png")                           # doctest: +SKIP
    >>> result.probability, result.decision, [w.code for w in result.abstain_reasons]  # doctest: +SKIP
    (0.79, 'abstain', ['model_shortcut', 'out_of_distribution'])
"""

from __future__ import annotations

import base64
import dataclasses
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidcxr import MEDICAL_USE_BANNER
from covidcxr.errors import CovidCXRError, ImageReadError
from covidcxr.serve.checks import (
    DEFAULT_SERVICE_MAX_PIXELS,
    InputInfo,
    InputWarning,
    inspect_input,
    opacity_cut_warnings,
    segmentation_warnings,
)
from covidcxr.serve.errors import EmptyUpload, EngineUnavailable, ServeError, UnreadableImage
from covidcxr.train.inference import LoadedRun, latest_run, load_run

__all__ = ["ABSTAIN", "ABSTAIN_CODES", "DEFAULT_RUN_ROOTS", "Prediction", "Predictor", "abstain_reasons", "audit_warnings", "default_run"]

#: Requests screened (header parsed, colour files decoded at reduced size) at the same time.
SCREENING_SLOTS = 2
#: Where a run is looked for when none is named, in order, relative to the current directory.
DEFAULT_RUN_ROOTS: tuple[str, ...] = ("runs", "demo")
#: The decision of a prediction that must not be acted on (`abstain_reasons` says why).
ABSTAIN = "abstain"


def default_run(roots: tuple[str | Path, ...] = DEFAULT_RUN_ROOTS) -> Path:
    """The newest classifier run under the first of ``roots`` that holds one (`latest_run`).

    Raises:
        CovidCXRError: none found; the message names where it looked and how to make one.
    """
    return latest_run(*roots)


#: Warning codes that make a prediction abstain (`abstain_reasons`): the image is not what the
#: model was made for, or the model itself has not earned trust. Others stay warnings.
IMAGE_ABSTAIN_CODES = ("out_of_distribution", "lateral_view", "segmentation_rejected", "implausible_segmentation")
MODEL_ABSTAIN_CODES = ("model_no_skill", "model_shortcut", "model_not_audited")
ABSTAIN_CODES = IMAGE_ABSTAIN_CODES + MODEL_ABSTAIN_CODES


def audit_warnings(run_dir: Path) -> list[InputWarning]:
    """The shortcut audit's word on the *model* (``RUN/audit/audit.json``), attached to every prediction.

    * verdict ``no_skill`` → ``model_no_skill`` (its test AUC interval includes 0.5: no
      decision of it is better than chance);
    * verdict ``shortcut`` (or any ``shortcut`` finding) → ``model_shortcut``;
    * no audit, or an unreadable one → ``model_not_audited``. Deliberately a reason to
      abstain: the skill gate lives in the audit, so an unaudited model has never been shown
      to beat chance or to look at the lungs rather than the source (``covidcxr audit RUN``
      fixes it in minutes; `covidcxr demo` runs it).

    ``warning`` and ``ok`` verdicts give nothing here (the model card shows them).
    """
    from covidcxr.rundir import RunDir

    try:
        audit = RunDir(run_dir).read_audit()
    except CovidCXRError:
        audit = None
    findings = audit.get("findings") if isinstance(audit, dict) else None
    if not isinstance(findings, list):
        return [
            InputWarning(
                "model_not_audited",
                "this model was never audited (or its audit is unreadable): nobody has checked that it beats chance "
                "or that it reads the lungs rather than the image's source — run `covidcxr audit` on the run",
            )
        ]
    if audit.get("verdict") == "no_skill":
        gate = next((f for f in findings if isinstance(f, dict) and f.get("severity") == "no_skill"), {})
        return [
            InputWarning(
                "model_no_skill",
                "the audit found no skill: the model's test AUC interval includes 0.5, so its probabilities are no better "
                "than chance" + (f" — {gate.get('text')}" if gate.get("text") else ""),
            )
        ]
    shortcuts = [f for f in findings if isinstance(f, dict) and f.get("severity") == "shortcut"]
    if audit.get("verdict") != "shortcut" and not shortcuts:
        return []
    first = str(shortcuts[0].get("text", "")) if shortcuts else ""
    return [
        InputWarning(
            "model_shortcut",
            f"the shortcut audit of this model found {len(shortcuts)} shortcut finding(s): its probabilities may reflect "
            f"the image's source rather than its lungs" + (f" — e.g. {first}" if first else ""),
        )
    ]


def abstain_reasons(warnings: list[InputWarning]) -> list[InputWarning]:
    """The warnings that make a prediction abstain (`ABSTAIN_CODES`), in their order, one per code.

    Example:
        >>> [w.code for w in abstain_reasons([InputWarning("low_resolution", "..."), InputWarning("lateral_view", "...")])]
        ['lateral_view']
    """
    seen: set[str] = set()
    found = []
    for warning in warnings:
        if warning.code in ABSTAIN_CODES and warning.code not in seen:
            seen.add(warning.code)
            found.append(warning)
    return found


def hollow_run_warnings(run_dir: Path) -> list[InputWarning]:
    """A warning for every prediction of a hollow run (`covidcxr.rundir.RunDir.warnings`, severity ``warning``).

    E.g. ``random_frozen_backbone``: the run was trained with frozen random backbone layers
    (``model.allow_random_frozen: true``), so its features were never learned.
    """
    from covidcxr.rundir import RunDir

    try:
        found = RunDir(run_dir).warnings()
    except CovidCXRError:
        return []
    return [InputWarning(f"model_{w['id']}", f"this model is a hollow run: {w.get('text', '')}") for w in found if w.get("severity") == "warning"]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass(eq=False)
class Prediction:
    """The explained result for one image.

    Attributes:
        probability: positive-class probability (binary run) or the top class's.
        probabilities: class name -> probability.
        decision: the answer: ``"abstain"`` when `abstain_reasons` is non-empty and abstention
            is on, else `model_decision`.
        threshold: the run's decision threshold (None for multi-class runs: argmax).
        warnings: reasons not to trust the result as it stands.
        input: `InputInfo` (format, size, view; never identifiers).
        segmentation: lung area fraction, left/right balance, rejection reason.
        out_of_distribution: score, threshold, flag, nearest training sources (or why
            unavailable).
        saliency: Grad-CAM's lung-focus fraction and the lung area (None without Grad-CAM).
        overlays: name -> PNG bytes (``input``, ``lung_mask``, ``gradcam``).
        timings_ms: per stage, milliseconds.
        run: the run's name. engine: ``torch`` or ``onnx``.
        model_decision: the class the model's probability gives (binary: positive iff
            ``probability >= threshold``) — with an abstention, not to be acted on.
        abstain_reasons: the warnings that make it abstain (`ABSTAIN_CODES`); listed even
            when abstention is off (what it would have abstained for).
        abstention: ``"on"``, or ``"off"`` (``--no-abstain``: research use only).
    """

    probability: float
    probabilities: dict[str, float]
    decision: str
    threshold: float | None
    warnings: list[InputWarning]
    input: InputInfo
    segmentation: dict[str, Any]
    out_of_distribution: dict[str, Any]
    saliency: dict[str, Any] | None
    overlays: dict[str, bytes]
    timings_ms: dict[str, float]
    run: str
    engine: str
    model_decision: str = ""
    abstain_reasons: list[InputWarning] = dataclasses.field(default_factory=list)
    abstention: str = "on"

    @property
    def abstained(self) -> bool:
        """True when the answer is ``abstain``."""
        return self.decision == ABSTAIN

    def to_dict(self, overlays: str | dict[str, str] = "data_uri") -> dict[str, Any]:
        """JSON-ready dict.

        Args:
            overlays: ``"data_uri"`` (PNG as ``data:image/png;base64,...``), ``"none"``, or
                a mapping name -> what to show instead (e.g. the file the CLI wrote).
        """
        if overlays == "data_uri":
            shown: Any = {name: _data_uri(png) for name, png in self.overlays.items()}
        elif overlays == "none":
            shown = {}
        else:
            shown = dict(overlays)
        return {
            "run": self.run,
            "engine": self.engine,
            "banner": MEDICAL_USE_BANNER,
            "probability": round(float(self.probability), 6),
            "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "decision": self.decision,
            "model_decision": self.model_decision,
            "abstention": self.abstention,
            "abstain_reasons": [{"code": w.code, "sentence": w.message} for w in self.abstain_reasons],
            "probability_note": (
                "not to be acted on: the service abstained for the reasons listed" if self.abstained
                else "abstention is off (research use): this decision was not checked against the abstention rules"
                if self.abstention == "off" else "the model's output at its operating point; not a diagnosis"
            ),
            "threshold": self.threshold,
            "warnings": [w.to_dict() for w in self.warnings],
            "input": self.input.to_dict(),
            "segmentation": self.segmentation,
            "out_of_distribution": self.out_of_distribution,
            "saliency": self.saliency,
            "overlays": shown,
            "timings_ms": self.timings_ms,
        }


class _NegatedLogit(torch.nn.Module):
    """A binary classifier with its logit negated: Grad-CAM of it explains a *negative* decision.

    `covidcxr.audit.saliency.gradcam` explains the positive logit of a binary run; for an
    image the model calls negative that map is (nearly) empty — there is no positive
    evidence to show. Explaining ``-logit`` shows where the evidence *against* the positive
    class lies, so every decision gets a map of where the model looked.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    @property
    def gradcam_layer(self) -> str:
        return "inner." + self.inner.gradcam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.inner(x)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


class Predictor:
    """A loaded run, ready to explain predictions on single images (thread-safe).

    Args:
        run: the loaded run.
        engine: ``"torch"``, ``"onnx"`` (the run's ``export/`` from ``covidcxr export RUN --onnx``), or
            ``"auto"``: onnx when the run has a current export, else torch (`engine_note` says
            which and why). Measured on 2 quiet cores (``benchmarks/bench_serve.py``,
            ``serve.predict_speed``): onnxruntime runs a ResNet-18 ~1.5-2x faster than
            PyTorch, the U-Net and a small CNN alike.
        out_of_distribution: build/load the embedding reference (False: the check is
            reported as unavailable).
        max_pixels: refuse images whose header declares more pixels.
        progress: say so, with a progress bar, when the out-of-distribution reference must be
            built (a run trained before training wrote it; `covidcxr.serve.reference`).
        threads: CPU threads for PyTorch (process-wide: ``torch.set_num_threads``) and
            onnxruntime; None keeps PyTorch's default and gives onnxruntime every core this
            process may use. On a CPU shared with other work, 1 is often the fastest: with
            more threads than free cores, PyTorch's and onnxruntime's worker threads wait on
            each other (``benchmarks/bench_serve.py`` measures both).
        selected: how the run was chosen when it is a shipped model (`covidcxr.zoo.select`), shown
            on the model card (``selected``) and the page; None for a run named by path.
        abstain: answer ``"abstain"`` when a reason in `ABSTAIN_CODES` applies (default).
            False is for research use only: the class decided at the threshold is returned
            whatever the reasons, and the answer says ``abstention: "off"``.

    Loading ends with one warm-up pass of both networks on a blank input, so the first
    request does not pay for oneDNN's / onnxruntime's kernel selection.

    The networks run one request at a time (a lock): MONAI's Grad-CAM keeps hooks and
    activations on the shared model, and on a few CPU cores parallel forward passes only
    compete for the same cores. Screening runs before the lock, `SCREENING_SLOTS` at a time,
    so refusals do not queue behind predictions while memory stays bounded.
    """

    def __init__(
        self,
        run: LoadedRun,
        engine: str = "auto",
        out_of_distribution: bool = True,
        max_pixels: int = DEFAULT_SERVICE_MAX_PIXELS,
        progress: bool = False,
        threads: int | None = None,
        abstain: bool = True,
        selected: str | None = None,
    ):
        from covidcxr.preprocess.pipeline import load_segmenter
        from covidcxr.serve.engines import ENGINES, OnnxClassifier, OnnxLungSegmenter, TorchClassifier

        if engine not in ENGINES:
            raise CovidCXRError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
        if threads is not None:
            if threads < 1:
                raise CovidCXRError(f"threads must be at least 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.run = run
        self.selected = selected
        self.engine = engine
        self.threads = threads
        self.abstain = bool(abstain)
        self.max_pixels = int(max_pixels)
        # The run's preprocessing with the U-Net as mask source (module docstring, step 2).
        self.config = run.preprocess_config.model_copy(update={"mask_source": "model"})
        self.torch_classifier = TorchClassifier(run)
        # eval(): MONAI's Grad-CAM restores the wrapper's own training flag afterwards, which
        # would otherwise switch the shared network's BatchNorms to training mode.
        self._negative_run = dataclasses.replace(run, model=_NegatedLogit(run.model).eval()) if run.binary else None
        self.export_summary: dict[str, Any] | None = None
        self.classifier: Any = self.torch_classifier
        self.segmenter: Any = None
        self.engine_note = "PyTorch, as asked" if engine == "torch" else ""
        self.engine_problem: str | None = None  # why auto fell back to PyTorch (may name paths: console only)
        if engine in ("onnx", "auto"):
            from covidcxr.serve.onnx_export import CLASSIFIER_FILE, SEGMENTER_FILE, read_export

            try:
                folder, self.export_summary = read_export(run.run_dir, run.weights_fingerprint)
                self.classifier = OnnxClassifier(folder / CLASSIFIER_FILE, threads=threads)
                self.segmenter = OnnxLungSegmenter(folder / SEGMENTER_FILE, self.config.segmenter_weights, threads=threads)
                self.engine, self.engine_note = "onnx", "onnxruntime on the run's ONNX export" + (" (auto: the export is current)" if engine == "auto" else "")
            except EngineUnavailable as exc:
                if engine == "onnx":
                    raise
                # The note reaches the page and GET /model: no paths in it (the CLI prints `engine_problem`).
                self.export_summary, self.classifier, self.engine_problem = None, self.torch_classifier, str(exc)
                self.engine, self.engine_note = "torch", (
                    "PyTorch (auto: the run has no current ONNX export; `covidcxr export RUN --onnx` makes one, "
                    "and onnxruntime runs a ResNet-18 ~1.5-2x faster)"
                )
        if self.segmenter is None:
            self.segmenter = load_segmenter(self.config.segmenter_weights)
        self._warm_up()
        self.reference = None
        self.reference_problem: str | None = "disabled"
        if out_of_distribution:
            from covidcxr.serve.reference import load_or_build_reference

            try:
                # Always PyTorch embeddings: the reference is engine-independent (ONNX agrees
                # to the export's stated tolerance).
                stage_sizes = self.torch_classifier.module.stage_sizes()
                # Normally written at the end of training; an older run gets it built here, once, with a message.
                say = (lambda message: print(message, file=sys.stderr, flush=True)) if progress else (lambda _message: None)
                self.reference = load_or_build_reference(run, self.torch_classifier, stage_sizes, progress=progress, say=say)
                self.reference_problem = None
            except CovidCXRError as exc:
                self.reference_problem = str(exc)
        self.model_warnings = audit_warnings(run.run_dir) + hollow_run_warnings(run.run_dir)
        self._lock = threading.Lock()
        self._screening = threading.BoundedSemaphore(SCREENING_SLOTS)

    def _warm_up(self) -> None:
        """One pass of the U-Net and the classifier on blank inputs (kernel selection happens here, not on a request)."""
        size = int(getattr(self.segmenter, "input_size", 0) or 0)
        if size and hasattr(self.segmenter, "forward_prepared"):
            self.segmenter.forward_prepared(np.zeros((1, size, size), dtype=np.float32))
        self.classifier(np.zeros((1, *self.config.size), dtype=np.float32))

    @classmethod
    def load(
        cls,
        run_dir: str | Path | None = None,
        engine: str = "auto",
        **kwargs: Any,
    ) -> Predictor:
        """Load ``run_dir`` (None: the shipped ``covid`` model, `covidcxr.zoo.resolve`) and make a predictor."""
        from covidcxr.zoo import resolve

        return cls(load_run(run_dir if run_dir is not None else resolve(None)), engine=engine, **kwargs)

    # ------------------------------------------------------------------ model card
    def model_card(self) -> dict[str, Any]:
        """`covidcxr.serve.model_card.build_model_card` plus the engine and the warning rules."""
        from covidcxr.serve import checks
        from covidcxr.serve.model_card import build_model_card

        ood = self.reference.summary() if self.reference is not None else {"available": False, "reason": self.reference_problem}
        return build_model_card(
            self.run,
            extra={
                "selected": self.selected,
                "engine": self.engine,
                "engine_note": self.engine_note,
                "abstention": {
                    "enabled": self.abstain,
                    "abstains_when": {
                        "out_of_distribution": "the image is unlike the training images (distance check below)",
                        "lateral_view": "the DICOM says lateral view (the model saw frontal views only)",
                        "segmentation_rejected": "the lung segmentation failed",
                        "implausible_segmentation": "lung area or left/right balance outside the plausible range (e.g. a lateral view)",
                        "model_no_skill": "the audit found no skill (test AUC interval includes 0.5)",
                        "model_shortcut": "the audit found a shortcut",
                        "model_not_audited": "the run was never audited: no skill gate, no shortcut check",
                    },
                    "every_prediction_abstains_because": [
                        {"code": w.code, "sentence": w.message} for w in abstain_reasons(self.model_warnings)
                    ],
                },
                "onnx_export": self.export_summary,
                "out_of_distribution": ood,
                "inference_preprocess": "the run's preprocessing with mask_source=model (the lung U-Net), the code path of training",
                "warning_rules": {
                    "aspect_ratio_refused_outside": list(checks.ASPECT_REFUSE),
                    "aspect_ratio_warned_outside": list(checks.ASPECT_WARN),
                    "colour_fraction_refused_above": checks.COLOUR_REFUSE,
                    "colour_fraction_warned_above": checks.COLOUR_WARN,
                    "lung_area_plausible": list(checks.LUNG_AREA_PLAUSIBLE),
                    "lung_balance_plausible": list(checks.LUNG_BALANCE_PLAUSIBLE),
                    "possible_opacity_cut": f"the mask's shorter lung below {checks.OPACITY_CUT_HEIGHT_RATIO} of the taller one's height",
                    "lateral_view": "DICOM View Position = lateral; otherwise an extreme left/right lung balance",
                    "saliency_outside_lungs": "Grad-CAM lung-focus fraction below the lung-area fraction (less than a uniform map)",
                    "max_pixels": self.max_pixels,
                },
            },
        )

    # ------------------------------------------------------------------ prediction
    def predict_bytes(self, data: bytes, gradcam: bool = True) -> Prediction:
        """Predict an uploaded file's bytes (written to a private temporary file, name chosen here).

        Raises:
            EmptyUpload: no bytes. Otherwise as `predict_file`.
        """
        if not data:
            raise EmptyUpload("the uploaded file is empty (0 bytes)")
        with tempfile.TemporaryDirectory(prefix="covidcxr-upload-") as folder:  # mode 0700
            path = Path(folder) / "upload"
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return self.predict_file(path, gradcam=gradcam)

    def predict_file(self, path: str | Path, gradcam: bool = True) -> Prediction:
        """Screen, preprocess, classify, explain and judge one image file.

        Args:
            path: PNG, JPEG, TIFF, BMP or DICOM (format from content).
            gradcam: compute the Grad-CAM map and overlay (PyTorch; costs a backward pass).

        Raises:
            UnsupportedImageType, ImageTooLarge, UnreadableImage, NotAChestXray: see
                `covidcxr.preprocess.screening` (inspect_input; screen_pixels: blank, test pattern).
        """
        from covidcxr.audit.saliency import gradcam as gradcam_maps
        from covidcxr.audit.saliency import lung_focus_fraction
        from covidcxr.preprocess.pipeline import preprocess_batch
        from covidcxr.serve.overlays import gradcam_overlay, input_png, lung_mask_overlay

        start = time.perf_counter()
        timings: dict[str, float] = {}
        with self._screening:  # bounds the memory of concurrent decodes (a colour check decodes the file)
            info = inspect_input(path, self.max_pixels)
        timings["screen"] = _ms(start)
        with self._lock:
            step = time.perf_counter()
            # screen=True: the blank / test-pattern refusals training makes too (one check)
            (result,) = preprocess_batch([(path, None)], self.config, self.segmenter, screen=True)
            if isinstance(result, ServeError):
                raise result
            if isinstance(result, ImageReadError):
                raise UnreadableImage(result.reason) from None
            if isinstance(result, CovidCXRError):
                raise UnreadableImage(str(result).replace(str(path), "the image")) from None
            timings["preprocess"] = _ms(step)
            step = time.perf_counter()
            probabilities, embeddings = self.classifier(result.image[None])
            timings["classify"] = _ms(step)
            saliency_map = None
            negative = self.run.binary and float(probabilities[0]) < self.run.threshold
            if gradcam:
                step = time.perf_counter()
                explained = self._negative_run if negative else self.run
                saliency_map = gradcam_maps(explained, result.image[None])[0]
                timings["gradcam"] = _ms(step)

        step = time.perf_counter()
        warnings = list(self.model_warnings) + list(info.warnings)
        warnings += segmentation_warnings(result.mask_area_fraction, result.left_right_balance, result.rejected_reason)
        if result.rejected_reason is None:
            warnings += opacity_cut_warnings(result.original_mask)
        ood = self._out_of_distribution(embeddings, warnings)
        saliency = None
        decision = self._decide(probabilities[0])
        if saliency_map is not None:
            lung_area = float(result.lung_mask.mean())
            focus = float(lung_focus_fraction(saliency_map[None], result.lung_mask[None])[0])
            saliency = {
                "method": "Grad-CAM (MONAI, last stage" + (", computed with PyTorch" if self.engine == "onnx" else "") + ")",
                "explains": f"the decision {decision[1]!r}" + (" (the negated logit: evidence against the positive class)" if negative else ""),
                "lung_focus": None if focus != focus else round(focus, 4),
                "lung_area": round(lung_area, 4),
            }
            # 1 percentage point of slack: a flat map scores the lung area itself, up to rounding.
            if focus == focus and lung_area > 0 and focus < lung_area - 0.01:
                warnings.append(
                    InputWarning(
                        "saliency_outside_lungs",
                        f"only {focus:.0%} of the Grad-CAM map lies inside the lungs, less than a uniform map would "
                        f"({lung_area:.0%}): the model may be looking at something other than the lungs",
                    )
                )

        probability, label, threshold, by_class = decision
        reasons = abstain_reasons(warnings)

        overlays = {"input": input_png(result.image), "lung_mask": lung_mask_overlay(result.image, result.lung_mask)}
        if saliency_map is not None:
            overlays["gradcam"] = gradcam_overlay(result.image, saliency_map)
        timings["judge_and_draw"] = _ms(step)
        timings["total"] = _ms(start)
        return Prediction(
            probability=probability,
            probabilities=by_class,
            decision=ABSTAIN if reasons and self.abstain else label,
            model_decision=label,
            abstain_reasons=reasons,
            abstention="on" if self.abstain else "off",
            threshold=threshold,
            warnings=warnings,
            input=info,
            segmentation={
                "mask_area_fraction": round(float(result.mask_area_fraction), 4),
                "left_right_balance": None if result.left_right_balance != result.left_right_balance else round(float(result.left_right_balance), 4),
                "rejected_reason": result.rejected_reason,
                "mask_source": result.mask_used,
            },
            out_of_distribution=ood,
            saliency=saliency,
            overlays=overlays,
            timings_ms=timings,
            run=self.run.name,
            engine=self.engine,
        )

    def _decide(self, probabilities: np.ndarray) -> tuple[float, str, float | None, dict[str, float]]:
        """``(probability, decided class, threshold, class -> probability)`` for one image.

        Binary: positive iff the probability reaches the run's threshold; multi-class: argmax.
        """
        if self.run.binary:
            probability = float(probabilities)
            label = self.run.classes[1] if probability >= self.run.threshold else self.run.classes[0]
            return probability, label, float(self.run.threshold), {self.run.classes[0]: 1.0 - probability, self.run.classes[1]: probability}
        row = np.asarray(probabilities, dtype=np.float64)
        top = int(np.argmax(row))
        return float(row[top]), self.run.classes[top], None, {name: float(p) for name, p in zip(self.run.classes, row)}

    def _out_of_distribution(self, embeddings: np.ndarray, warnings: list[InputWarning]) -> dict[str, Any]:
        if self.reference is None:
            warnings.append(
                InputWarning("no_reference", f"the out-of-distribution check is unavailable for this run ({self.reference_problem})")
            )
            return {"available": False, "reason": self.reference_problem}
        scores, stages, nearest = self.reference.score(embeddings)
        score = float(scores[0])
        flagged = score > self.reference.threshold
        sources = sorted(set(nearest[0]), key=nearest[0].index)
        stage = int(stages[0]) + 1
        if flagged:
            warnings.append(
                InputWarning(
                    "out_of_distribution",
                    f"the image is unlike the training images (distance score {score:.2f} > threshold "
                    f"{self.reference.threshold:.2f}, furthest at backbone stage {stage} of {len(self.reference.stage_sizes)}); "
                    "a model trained on a few sources is unreliable on images unlike them",
                )
            )
        return {
            "available": True,
            "score": round(score, 6),
            "threshold": round(float(self.reference.threshold), 6),
            "flagged": bool(flagged),
            "calibration_percentile": round(self.reference.percentile(score), 2),
            "furthest_stage": stage,
            "nearest_training_sources": sources,
        }
