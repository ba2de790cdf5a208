"""``MODEL_CARD.md`` of a shipped model: data, metrics with intervals, audit verdict, operating point, limits.

Written by `covidcxr.zoo.package` from the packaged run's own files (``zoo.json``,
``evaluation.json``, ``audit/audit.json``, ``operating_point.json``) and a Markdown excerpt of
the leave-one-source-out table; every number on it is read from those files, never typed in
(Mitchell et al. 2019, "Model Cards for Model Reporting", FAT* '19: intended use, factors,
metrics, evaluation data, training data, caveats).

Example:
    >>> write_card(Path("src/covidcxr/zoo/models/covid"), metadata, loso_markdown)   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covidcxr import MEDICAL_USE_BANNER
from covidcxr.io.atomic import atomic_write_text
from covidcxr.rundir import RunDir
from covidcxr.serve.model_card import NOT_FOR

__all__ = ["card_markdown", "write_card"]

LOSO_PENDING = (
    "The leave-one-source-out table (`recipes/generalize.yaml`) had not finished when these weights were "
    "trained: the card's generalization numbers are **pending**. Until they are in, the only evidence about a "
    "hospital this model never saw is the seed papers' (AUC 0.4–0.7 on unseen sources) — assume that."
)


def _ci(metric: Any) -> str:
    if not isinstance(metric, dict) or metric.get("estimate") is None:
        return "–"
    if metric.get("low") is None or metric.get("high") is None:
        return f"{metric['estimate']:.2f}"
    return f"{metric['estimate']:.2f} [{metric['low']:.2f}, {metric['high']:.2f}]"


def _data_table(training: dict[str, Any]) -> list[str]:
    table = training["images_by_source_label"]
    labels = sorted({label for row in table.values() for label in row})
    lines = ["| source | " + " | ".join(labels) + " | total |", "|---|" + "---|" * (len(labels) + 1)]
    for source, row in sorted(table.items()):
        lines.append(f"| {source} | " + " | ".join(str(row.get(label, 0)) for label in labels) + f" | {sum(row.values())} |")
    splits = ", ".join(f"{name} {v['n_images']} images / {v['n_patients']} patients" for name, v in sorted(training["splits"].items()))
    return lines + ["", f"Patient-disjoint split (near-duplicates kept together): {splits}."]


def _test_table(evaluation: dict[str, Any]) -> list[str]:
    lines = ["| test source | AUC [95% CI] | sensitivity | specificity | n images | n patients |", "|---|---|---|---|---|---|"]
    rows = {**(evaluation.get("per_source") or {}), "all sources (pooled)": evaluation.get("overall") or {}}
    for source, m in rows.items():
        lines.append(
            f"| {source} | {_ci(m.get('auc'))} | {_ci(m.get('sensitivity'))} | {_ci(m.get('specificity'))} "
            f"| {m.get('n_images', '–')} | {m.get('n_patients', '–')} |"
        )
    return lines


def _audit_lines(audit: dict[str, Any]) -> list[str]:
    verdict = str(audit.get("verdict", "not audited")).upper()
    lines = [f"**Verdict: {verdict}** (`covidcxr audit`, on this model's test split)."]
    for finding in audit.get("findings") or []:
        if finding.get("severity") in ("no_skill", "shortcut", "warning", "ok"):  # "info" findings stay in audit.json
            lines.append(f"- *{finding['severity']}* ({finding['id']}): {finding['text']}")
    return lines


def card_markdown(folder: Path, metadata: dict[str, Any], loso: str | None) -> str:
    """The card's Markdown for the packaged run ``folder`` (see the module docstring)."""
    run = RunDir(folder)
    evaluation = run.read_evaluation() or {}
    audit = run.read_audit() or {}
    positive = metadata["labels"][-1]
    lines = [
        f"# Shipped model `{metadata['name']}` — {metadata['description']}",
        "",
        f"> **{MEDICAL_USE_BANNER}**",
        "",
        f"`covidcxr predict IMAGE --model {metadata['name']}` · labels {metadata['labels']} (output: probability of "
        f"`{positive}`) · input {metadata['resolution'][0]}×{metadata['resolution'][1]} px, histogram-equalised, "
        f"lungs masked by the shipped U-Net · {metadata['architecture']}, weights {metadata['weights_dtype']}, "
        f"{metadata['bytes']['checkpoints/best.ckpt'] / 1e6:.1f} MB.",
        "",
        "## Training data",
        "",
        f"The whole shared collection `{metadata['training_data']['collection']}` (images per source × label, frontal views):",
        "",
        *_data_table(metadata["training_data"]),
        "",
        "## Test split (sources it saw)",
        "",
        "Held-out patients of the same sources — not evidence about another hospital (every source was seen):",
        "",
        *_test_table(evaluation),
        "",
        "## A hospital it never saw (leave-one-source-out)",
        "",
        loso.strip() if loso else LOSO_PENDING,
        "",
        "## Shortcut audit",
        "",
        *_audit_lines(audit),
        "",
        "## Operating point",
        "",
        run.operating_point().describe() + ".",
        "",
        "## Must not be used for",
        "",
        *[f"- {item}" for item in NOT_FOR],
        "- children's films as evidence of adult disease or the reverse: the collection's paediatric films (Kermany) are all from one hospital",
        f"- reading its probability as the prevalence-adjusted risk of `{positive}`: it was trained on a curated, class-balanced draw",
        "",
        "## Reproduce",
        "",
        "From the repository root, with the collection beside the checkout:",
        "",
        f"    {metadata['reproduce']}",
        "",
        "It trains the recipe (a finished run is reused), evaluates and audits the run where that is not done, "
        "then packages it (`python -m covidcxr.zoo.package --help`).",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, metadata: dict[str, Any], loso: str | None) -> Path:
    """Write ``folder/MODEL_CARD.md`` atomically; returns its path."""
    path = Path(folder) / "MODEL_CARD.md"
    atomic_write_text(path, card_markdown(Path(folder), metadata, loso))
    return path
