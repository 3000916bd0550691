"""The ``tuner`` command line."""

from __future__ import annotations

import json
import sys

import typer

app = typer.Typer(
    name="tuner",
    help="Search the best EvoPrune token-merging schedule for a vision encoder under a latency budget, and export it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error (no traceback) and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of the exported schedule format."""
    from tuner.evoprune import schedule_schema

    typer.echo(json.dumps(schedule_schema(), indent=2))


def main() -> None:
    """Entry point: run the CLI; bad input ends with a one-line error and exit code 2."""
    from tuner.evoprune.errors import EvoPruneError

    try:
        app()
    except EvoPruneError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
