"""Shard files: deterministic tar writing under a temporary name, failures.jsonl, reading a shard back (its
samples' json and its sha256, in one streamed pass, local or remote).

The manifest that lists the shards is emi.formats.manifest's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from emi import storage
from emi.formats.manifest import ShardEntry
from emi.io import temporary_path

FAILURES = "failures.jsonl"
MEMBER_MTIME = 0  # fixed, so identical inputs give byte-identical shards


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_pattern(split: str) -> re.Pattern:
    return re.compile(re.escape(split) + r"-\d{6}\.tar")


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) tarfile writes for a regular file member (PAX format, fixed owner, mode and mtime)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MEMBER_MTIME, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_padding(size: int) -> bytes:
    """The zeros after a member's data up to the next tar block."""
    return bytes(-size % tarfile.BLOCKSIZE)


def tar_member(name: str, data: bytes) -> bytes:
    return tar_header(name, len(data)) + data + tar_padding(len(data))


class ShardWriter:
    """Writes one tar under its temporary name; `finish` renames it into place and returns its manifest entry.

    Members come as bytes (`add`) or as a part file of ready tar members that a worker wrote (`add_part`), which
    is copied in blocks and deleted: nothing as large as a clip is held in memory. The sha256 is taken on the way.
    `abort` removes the temporary file."""

    COPY_BLOCK = 1 << 20

    def __init__(self, path: Path):
        self.path = path
        self.tmp = temporary_path(path)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (open until commit or abort)
        self.digest = hashlib.sha256()
        self.size = 0
        self.keys: list[str] = []

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self._write(tar_member(name, data))
        self.keys.append(key)

    def add_part(self, key: str, part: Path) -> None:
        with open(part, "rb") as source:
            while block := source.read(self.COPY_BLOCK):
                self._write(block)
        part.unlink()
        self.keys.append(key)

    def finish(self) -> ShardEntry:
        end = 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks, then zeros up to a whole record, as tarfile does
        self._write(bytes(end + -(self.size + end) % tarfile.RECORDSIZE))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return ShardEntry(
            name=self.path.name,
            num_samples=len(self.keys),
            bytes=self.size,
            sha256=self.digest.hexdigest(),
            keys=list(self.keys),
        )

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def failure_lines(records: list[dict]) -> bytes:
    """failures.jsonl's bytes: one JSON object per line."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()


def read_failures(folder: str | Path) -> list[dict]:
    """The records of failures.jsonl in a folder or URL prefix, [] when there is none; ValueError when a line is
    not a JSON object."""
    path = storage.join(folder, FAILURES)
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{storage.shown(path)}: line {number} is not JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{storage.shown(path)}: line {number} is not a JSON object")
        records.append(record)
    return records


@dataclass(frozen=True)
class ShardScan:
    sha256: str
    bytes: int
    metadata: list[dict]  # the samples' `<key>.json` entries, in order


class _Hashing(io.RawIOBase):
    """A stream that hashes and counts what is read through it."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def scan_shard(location: str | Path) -> ShardScan:
    """A shard's sha256, size and samples' json, read once front to back (streamed: a remote shard is never held
    whole); ValueError naming it when it is missing or damaged."""
    try:
        with storage.open_stream(location) as stream:
            hashing = _Hashing(stream)
            with tarfile.open(fileobj=hashing, mode="r|") as tar:
                metadata = [
                    json.loads(tar.extractfile(member).read())
                    for member in tar
                    if member.isfile() and member.name.endswith(".json")
                ]
            while hashing.read(1 << 20):  # the end-of-archive blocks
                pass
    except FileNotFoundError:
        raise ValueError(f"{storage.shown(location)}: no such shard") from None
    except (OSError, EOFError, tarfile.TarError, json.JSONDecodeError) as err:
        raise ValueError(f"{storage.shown(location)}: unreadable shard ({err})") from None
    return ShardScan(hashing.digest.hexdigest(), hashing.size, metadata)
