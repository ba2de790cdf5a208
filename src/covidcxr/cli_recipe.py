"""``covidcxr recipe schema``: the recipe files' JSON Schema, for editors and validators.

Registered on the main app in `covidcxr.cli`. Thin: the schema comes from the pydantic
models in `covidcxr.train.recipe` and `covidcxr.experiments.recipe`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

recipe_app = typer.Typer(help="Recipe files: their JSON Schema.", no_args_is_help=True)


@recipe_app.command("schema")
def schema(
    kind: Annotated[str, typer.Option(help="'experiment' (training fields + the experiment: section) or 'train'.")] = "experiment",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the schema here instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of a recipe (e.g. for VS Code's YAML extension:
    ``# yaml-language-server: $schema=recipe.schema.json`` at the top of a recipe)."""
    from covidcxr.experiments.recipe import recipe_json_schema
    from covidcxr.io.atomic import atomic_write_text

    text = json.dumps(recipe_json_schema(kind), indent=2) + "\n"  # type: ignore[arg-type]
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
        typer.echo(f"wrote {out}")
