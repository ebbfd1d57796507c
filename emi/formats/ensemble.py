"""An ensemble folder's member list: `ensemble.json`, {"format": "emi-ensemble/1", "members": [...]}, the member
checkpoint folders relative to the ensemble folder (or absolute)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from emi.errors import UsageError
from emi.io import write_json_atomic

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "emi-ensemble/1"


def write_ensemble_record(folder: Path, members: list[Path]) -> Path:
    """The listing of `members`, relative to `folder` (moving both together keeps it working); returns its path."""
    relative = [os.path.relpath(Path(member).resolve(), folder.resolve()) for member in members]
    write_json_atomic(folder / ENSEMBLE_FILE, {"format": ENSEMBLE_FORMAT, "members": relative})
    return folder / ENSEMBLE_FILE


def read_ensemble_record(folder: Path) -> list[Path] | None:
    """The member folders an ensemble folder lists; None when `folder` holds no ensemble.json (it is then a
    checkpoint); UsageError naming the file when it is not a member list."""
    listing = folder / ENSEMBLE_FILE
    if not listing.is_file():
        return None
    try:
        document = json.loads(listing.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{listing}: not readable JSON ({err})") from None
    members = document.get("members") if isinstance(document, dict) else None
    if (
        not isinstance(document, dict)
        or document.get("format") != ENSEMBLE_FORMAT
        or not isinstance(members, list)
        or not members
        or not all(isinstance(member, str) for member in members)
    ):
        raise UsageError(f"{listing}: expected {{'format': {ENSEMBLE_FORMAT!r}, 'members': [checkpoint folders]}}")
    return [folder / member for member in members]
