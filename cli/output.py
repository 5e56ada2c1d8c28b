"""What every command prints besides its files: notes on stderr and the --json object on stdout."""

from __future__ import annotations

import sys

import typer

__all__ = ["NOTES", "note", "emit"]

#: Notes and warnings of the current command: printed on stderr as they come (without --json) and
#: included in the --json object (success or error).
NOTES: list[str] = []


def note(message: str, as_json: bool) -> None:
    NOTES.append(message)
    if not as_json:
        typer.echo(f"note: {message}", err=True)


def emit(result_summary: dict, as_json: bool):
    import json

    if as_json:
        doc = dict(result_summary)
        notes = list(dict.fromkeys([*doc.get("notes", []), *NOTES]))
        if notes:
            doc["notes"] = notes
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
        sys.stdout.flush()
