"""``covidcxr predict``, ``covidcxr serve`` and ``covidcxr export``: a trained run for people.

Registered on the main app in `covidcxr.cli`. Thin: the work is in `covidcxr.serve`
(`Predictor`, `create_app`, `export_onnx`); heavy imports happen only when a verb runs.

Which run: ``--run RUN``, or a shipped model by name (``--model covid|pneumonia``,
`covidcxr.zoo`); with neither, predict and serve use the shipped ``covid`` model and say so.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

RunOption = Annotated[
    Optional[Path],
    typer.Option("--run", help="Run directory (default: the shipped model named by --model, else the shipped 'covid' model)."),
]
ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", help="A shipped model by name: covid (COVID-19 vs rest) or pneumonia (pneumonia vs normal); see its MODEL_CARD.md."),
]
EngineOption = Annotated[
    str,
    typer.Option(help="auto (onnx when the run has a current `covidcxr export RUN --onnx`, else torch), torch, or onnx; Grad-CAM always uses PyTorch."),
]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads for PyTorch and onnxruntime (default: theirs); 1 is often fastest on a shared CPU.")]
AbstainOption = Annotated[
    bool,
    typer.Option(
        "--abstain/--no-abstain",
        help="Answer 'abstain' (with the reasons) for out-of-distribution, lateral or badly segmented images and for a model "
        "the audit failed or never checked. --no-abstain is for research only: the class at the threshold is always given "
        "and the answer says abstention: off.",
    ),
]


def _overlay_names(images: list[Path]) -> list[str]:
    """A file stem per image, made unique (two inputs may share a name in different folders)."""
    names, seen = [], {}
    for image in images:
        stem = image.stem or "image"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}-{count}")
    return names


def _print_prediction(image: Path, payload: dict[str, Any]) -> None:
    threshold = payload["threshold"]
    table = Table(title=escape(f"{image} — run {payload['run']} ({payload['engine']})"), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    abstained = payload["decision"] == "abstain"
    table.add_row("decision", "[bold red]ABSTAIN[/bold red] — do not act on this result" if abstained else escape(payload["decision"]))
    probability = f"{payload['probability']:.3f}" + ("" if threshold is None else f" (threshold {threshold:g})")
    if abstained:
        probability += escape(f" — not to be acted on (the model alone would say {payload['model_decision']})")
    table.add_row("probability", probability)
    if payload["abstention"] == "off":
        table.add_row("abstention", "[bold yellow]OFF (--no-abstain, research use only)[/bold yellow]")
    info = payload["input"]
    table.add_row("image", escape(f"{info['format']} {info['width']}x{info['height']}, view {info['view']}"))
    seg = payload["segmentation"]
    table.add_row("lungs", f"area {seg['mask_area_fraction']:.0%}, left/right balance {seg['left_right_balance']}")
    ood = payload["out_of_distribution"]
    if ood.get("available"):
        table.add_row("distribution", f"score {ood['score']:.2f} vs threshold {ood['threshold']:.2f}" + (" [yellow](unlike training)[/yellow]" if ood["flagged"] else ""))
    saliency = payload["saliency"]
    if saliency:
        table.add_row("Grad-CAM", f"{saliency['lung_focus'] if saliency['lung_focus'] is not None else '-'} of the map inside the lungs (lung area {saliency['lung_area']})")
    for name, path in payload["overlays"].items():
        table.add_row(f"overlay {name}", escape(str(path)))
    console.print(table)
    for reason in payload["abstain_reasons"]:
        label = "abstain" if abstained else "would abstain"
        console.print(f"  [bold red]{label}[/bold red] {escape(reason['code'])}: {escape(reason['sentence'])}", highlight=False)
    listed = {reason["code"] for reason in payload["abstain_reasons"]}
    others = [w for w in payload["warnings"] if w["code"] not in listed]  # a reason is printed once, above
    if others:
        for warning in others:
            console.print(f"  [yellow]warning[/yellow] {escape(warning['code'])}: {escape(warning['message'])}", highlight=False)
    elif not listed:
        console.print("  no warnings", highlight=False)


def predict(
    images: Annotated[list[Path], typer.Argument(help="Chest radiographs or folders (walked recursively): PNG, JPEG, TIFF, BMP or DICOM, format from content.")],
    run: RunOption = None,
    model: ModelOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object per image (a list) instead of tables.")] = False,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Batch mode: one row per file (refused ones with the reason) in this CSV, written atomically; a rerun resumes.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the overlay PNGs (<image>.input.png, .lungs.png, .gradcam.png).")] = Path("predictions"),
    overlays: Annotated[Optional[bool], typer.Option("--overlays/--no-overlays", help="Write the overlay PNGs (default: yes, except with --csv).")] = None,
    gradcam: Annotated[Optional[bool], typer.Option("--gradcam/--no-gradcam", help="Compute the Grad-CAM map, a backward pass (default: yes, except with --csv).")] = None,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    abstain: AbstainOption = True,
) -> None:
    """Probability, decision at the run's threshold, lung-mask and Grad-CAM overlays, and warnings per image.

    Every file is tried; unreadable or refused ones are reported with the reason. Without
    --csv the command exits with status 1 after the others are done if any was refused;
    with --csv every outcome is a row of the CSV and the status is 0.
    """
    from covidcxr import MEDICAL_USE_BANNER
    from covidcxr.errors import CovidCXRError
    from covidcxr.serve.batch import expand_inputs, predict_to_csv
    from covidcxr.serve.predictor import Predictor
    from covidcxr.zoo import select

    batch = csv is not None
    overlays = (not batch) if overlays is None else overlays
    gradcam = (not batch) if gradcam is None else gradcam
    files = expand_inputs(images)
    run_dir, chosen = select(run, model)
    predictor = Predictor.load(run_dir, engine=engine, progress=not json_output, threads=threads, abstain=abstain, selected=chosen)
    if not json_output:
        from covidcxr.serve.model_card import one_line_summary

        console.print(f"[bold yellow]{MEDICAL_USE_BANNER}")
        _say_shipped(chosen, run_dir)
        console.print(escape(one_line_summary(predictor.model_card())), highlight=False)
        if not abstain:
            console.print("[bold yellow]abstention is OFF (--no-abstain): research use only — decisions are given even where the service would abstain[/bold yellow]")
    results: list[dict[str, Any]] = []
    names = dict(zip(files, _overlay_names(files)))

    def report(image: Path, prediction: Any, error: CovidCXRError | None) -> None:
        if error is not None:
            results.append({"image": str(image), "error": getattr(error, "code", "invalid_input"), "detail": str(error)})
            if not json_output:
                err_console.print(f"[bold red]refused[/bold red] {escape(str(image))}: {escape(str(error))}", highlight=False)
            return
        payload = {"image": str(image), **prediction.to_dict(overlays=_write_overlays(prediction, out, names.get(image, image.stem)) if overlays else "none")}
        results.append(payload)
        if not json_output and not batch:
            _print_prediction(image, payload)

    if batch:
        from contextlib import nullcontext

        from covidcxr.parallel import make_progress

        def on_result(image: Path, row: dict[str, Any], prediction: Any) -> None:
            report(image, prediction, None if prediction is not None else CovidCXRError(row["detail"]))

        with nullcontext() if json_output else make_progress(transient=True) as progress:
            task = None if progress is None else progress.add_task("predicting", total=len(files))
            advance = None if progress is None else (lambda: progress.advance(task))
            summary = predict_to_csv(predictor, files, csv, gradcam=gradcam, on_result=on_result, on_file=advance)
        if not json_output:
            console.print(
                escape(f"wrote {summary['csv']}: {summary['files']} files, {summary['predicted']} predicted, "
                       f"{summary['refused']} refused (reason in the CSV), {summary['reused']} reused from an earlier run"),
                highlight=False,
            )
    else:
        for image in files:
            try:
                prediction = predictor.predict_file(image, gradcam=gradcam)
            except CovidCXRError as exc:
                report(image, None, exc)
                continue
            report(image, prediction, None)
    if json_output:
        sys.stdout.write(json.dumps(results, indent=2, default=str) + "\n")
    if not batch and any("error" in r for r in results):
        raise typer.Exit(1)


def _say_shipped(chosen: str | None, run_dir: Path) -> None:
    """Print which shipped model is used and where its card is (nothing for a run given by path)."""
    if chosen is not None:
        console.print(escape(f"{chosen}; model card: {Path(run_dir) / 'MODEL_CARD.md'}"), style="bold", highlight=False)


def _write_overlays(prediction: Any, out: Path, name: str) -> dict[str, str]:
    """Write a prediction's overlay PNGs as ``out/<name>.<kind>.png``; returns kind -> path."""
    from covidcxr.io.atomic import atomic_write_bytes

    suffix = {"input": "input", "lung_mask": "lungs", "gradcam": "gradcam"}
    written = {}
    for overlay, png in prediction.overlays.items():
        path = out / f"{name}.{suffix.get(overlay, overlay)}.png"
        atomic_write_bytes(path, png)
        written[overlay] = str(path)
    return written
def _read_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token: ``--token-file``, else ``$COVIDCXR_SERVE_TOKEN``, else ``--token`` (warned: visible in ``ps``)."""
    from covidcxr.errors import CovidCXRError

    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CovidCXRError(f"--token-file {token_file}: cannot read it ({exc})") from None
        if not text or len(text.splitlines()) != 1:
            raise CovidCXRError(f"--token-file {token_file}: expected the token alone on one line, found {'nothing' if not text else 'several lines'}")
        if token_file.stat().st_mode & 0o077:
            err_console.print(escape(f"warning: {token_file} is readable by other users; chmod 600 it"), style="yellow", highlight=False)
        return text
    if token:
        err_console.print(
            "[bold yellow]warning:[/bold yellow] a token given with --token is visible to every user of this machine (ps, /proc); "
            "use --token-file FILE or the environment variable COVIDCXR_SERVE_TOKEN",
            highlight=False,
        )
        return token
    return os.environ.get("COVIDCXR_SERVE_TOKEN") or None


def serve(
    run: RunOption = None,
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    engine: EngineOption = "auto",
    token_file: Annotated[
        Optional[Path], typer.Option("--token-file", help="File holding the bearer token required on /predict, /model and /openapi.json (or set $COVIDCXR_SERVE_TOKEN).")
    ] = None,
    token: Annotated[Optional[str], typer.Option(help="The token on the command line: works, but every user of the machine sees it in ps; prefer --token-file.")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB.")] = 50.0,
    gradcam: Annotated[bool, typer.Option("--gradcam/--no-gradcam", help="Grad-CAM by default (a request may say gradcam=false).")] = True,
    threads: ThreadsOption = None,
    header_timeout: Annotated[float, typer.Option(help="Seconds to receive a request's head; then 408 and the connection closed.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds to receive a request's body once its head is in; then 408.")] = 60.0,
    max_active: Annotated[int, typer.Option(help="Predictions running at once (a fixed pool of threads).")] = 2,
    max_queue: Annotated[int, typer.Option(help="Predictions waiting beyond --max-active; more get 503 with Retry-After.")] = 32,
    max_megapixels_in_flight: Annotated[float, typer.Option(help="Decoded megapixels of the running predictions together (from the headers).")] = 80.0,
    max_connections: Annotated[int, typer.Option(help="Open connections before new requests get 503 (file descriptors).")] = 1000,
    abstain: AbstainOption = True,
) -> None:
    """Serve a run over HTTP: POST /predict (multipart field 'file'), GET /model, GET /health, and an upload page at /."""
    from covidcxr import MEDICAL_USE_BANNER
    from covidcxr.errors import CovidCXRError
    from covidcxr.serve.app import ServeSettings, create_app
    from covidcxr.serve.predictor import Predictor
    from covidcxr.serve.server import ServerLimits, build_server, tame_malloc
    from covidcxr.zoo import select

    if max_upload_mb <= 0:
        raise CovidCXRError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    for name, value in (("--header-timeout", header_timeout), ("--body-timeout", body_timeout), ("--max-active", max_active), ("--max-megapixels-in-flight", max_megapixels_in_flight), ("--max-connections", max_connections)):
        if value <= 0:
            raise CovidCXRError(f"{name} must be positive, got {value}")
    token = _read_token(token, token_file)
    tame_malloc()  # before the worker threads exist: fewer malloc arenas, big arrays given back when freed
    run_dir, chosen = select(run, model)
    predictor = Predictor.load(run_dir, engine=engine, progress=True, threads=threads, abstain=abstain, selected=chosen)
    settings = ServeSettings(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        token=token,
        gradcam=gradcam,
        body_timeout=body_timeout,
        max_active=max_active,
        max_queue=max_queue,
        max_pixels_in_flight=int(max_megapixels_in_flight * 1e6),
    )
    limits = ServerLimits(header_timeout=header_timeout, body_timeout=body_timeout, max_connections=max_connections)
    console.print(f"[bold yellow]{MEDICAL_USE_BANNER}")
    _say_shipped(chosen, run_dir)
    console.print(escape(f"serving run {predictor.run.name} ({predictor.run.run_dir}) on {predictor.engine_note} at http://{host}:{port}/"), highlight=False)
    if predictor.engine_problem:
        console.print(escape(f"[engine: {predictor.engine_problem}]"), style="dim", highlight=False)
    if not abstain:
        console.print("[bold yellow]abstention is OFF (--no-abstain): research use only; the page says so on every result[/bold yellow]")
    if predictor.reference is None:
        console.print(escape(f"[out-of-distribution check unavailable: {predictor.reference_problem}]"), style="yellow", highlight=False)
    # One line per request from the service itself (never a file name or an identifier).
    service_log = logging.getLogger("covidcxr.serve")
    if not service_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        service_log.addHandler(handler)
        service_log.setLevel(logging.INFO)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print("[bold yellow]warning:[/bold yellow] listening beyond loopback without a token: anyone who can reach it can use it")
    build_server(create_app(predictor, settings), host, port, limits).run()


def export(
    run: Annotated[Optional[Path], typer.Argument(help="Run directory to export (or --model NAME).")] = None,
    model: ModelOption = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export the classifier and the lung U-Net to ONNX (RUN/export/).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder to write into (default: RUN/export).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the export summary as JSON.")] = False,
) -> None:
    """Export a run for other runtimes; the agreement with PyTorch is measured and written to export.json."""
    from covidcxr.errors import CovidCXRError
    from covidcxr.serve.onnx_export import export_onnx

    from covidcxr.zoo import select

    if not onnx:
        raise CovidCXRError("choose an export format: --onnx (the only one so far)")
    run, chosen = select(run, model, writable=True, default=False)  # a shipped model: its working copy under runs/
    if not json_output:
        _say_shipped(chosen, run)
    summary = export_onnx(run, out)
    if json_output:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    from covidcxr.rundir import RunDir

    folder = out or RunDir(run).export_dir
    classifier, unet = summary["classifier"], summary["lung_unet"]
    console.print(escape(f"wrote {folder}/{classifier['file']}, {unet['file']} and export.json in {summary['seconds']} s"), highlight=False)
    console.print(
        f"max |ONNX - PyTorch| on {summary['n_samples']} samples: classifier probability {classifier['max_abs_diff_probability']:.2e}, "
        f"embedding {classifier['max_abs_diff_embedding']:.2e}; lung U-Net probability {unet['max_abs_diff_probability']:.2e} "
        f"(tolerance {summary['tolerance']:g}); mask Dice vs the bf16 PyTorch path {unet['mask_dice_vs_torch_bf16_fast_path_mean']:.4f}",
        highlight=False,
    )
