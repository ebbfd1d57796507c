"""Files and folders written so that a crash never leaves one that looks complete: write under a hidden temporary
name, flush to disk, rename into place (atomic on POSIX file systems)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """Where a file is written before being renamed into place: hidden, so never taken for the real thing."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: leave no half-written temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` in the place of `final` (which may exist). A folder cannot be renamed over a
    non-empty one, so the old one is first moved aside; a crash in between leaves it complete under the aside
    name, never a half-written `final`."""
    aside = final.with_name(f".old-{final.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
