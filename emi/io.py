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


def folder_files(folder: Path) -> list[str]:
    """The regular files under `folder`, as sorted relative POSIX paths."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def file_record(path: Path) -> dict[str, int | str]:
    """What `file_problem` later checks a file against: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def is_file_record(record: object) -> bool:
    """Whether `record` has the shape of a file_record: a size in bytes and a sha256."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("bytes"), int)
        and not isinstance(record["bytes"], bool)
        and record["bytes"] >= 0
        and isinstance(record.get("sha256"), str)
        and len(record["sha256"]) == 64
        and all(c in "0123456789abcdef" for c in record["sha256"])
    )


def file_problem(folder: Path, name: str, record: dict[str, int | str]) -> str | None:
    """Why file `name` of `folder` is no longer the one `record` (a file_record) describes; None when it is."""
    path = folder / name
    if path.is_dir():
        return f"{name}: a folder, where a file was written"
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{name}: {size} bytes, {record['bytes']} when written"
    if sha256_file(path) != record["sha256"]:
        return f"{name}: its sha256 differs from when it was written"
    return None


def folder_records(folder: Path) -> dict[str, dict[str, int | str]]:
    """{relative path: file_record} of every file under `folder`."""
    return {name: file_record(folder / name) for name in folder_files(folder)}


def folder_problems(folder: Path, records: dict[str, dict[str, int | str]]) -> list[str]:
    """How the files under `folder` differ from `records` (a folder_records): one line per recorded file that is
    missing or changed."""
    return [problem for name, record in records.items() if (problem := file_problem(folder, name, record))]


def records_digest(records: dict[str, dict[str, int | str]]) -> str:
    """One sha256 for a set of file records (relative path -> file_record): equal digests, equal contents."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def link_or_copy_folder(source: Path, target: Path) -> None:
    """Put every file of `source` under `target`: a hard link where the file system allows one (no space
    used, and emi never rewrites a file in place: exports are swapped in as new files), a copy otherwise."""
    for name in folder_files(source):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / name, destination)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(source / name, destination)
