"""From the labels CSV and the videos folder to the sorted list of clips to build, and the rows that cannot be.

A row's `Filename` is resolved inside the videos folder: the exact relative path first, else the one file in
that folder whose stem equals the Filename's stem; a Filename with spaces around it is tried as written first,
then stripped, and the sample's json says which matched (`filename_note`). Absolute paths, `..` and symlinks that
lead outside the folder are refused. The clip id (WebDataset key) is the file's stem. Top-level files that no row
names are reported too, since their labels are missing (hidden files and NOT_CLIPS aside).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from emi import storage
from emi.errors import UsageError
from emi.shards.labels import LabelTable, parse_labels

# Files in a videos folder that are never clips: labels, transcripts, notes. Every other file is taken for one.
NOT_CLIPS = {".csv", ".json", ".jsonl", ".md", ".txt"}


@dataclass(frozen=True)
class SampleOptions:
    split: str
    fps: float
    sample_rate: int
    frame_size: int
    asr_model: str | None  # Whisper name or path, None: no recognition
    face_crop: bool
    decoder_threads: int = 0  # per clip; 0: FFmpeg's choice


@dataclass(frozen=True)
class ClipJob:
    key: str  # clip id: the file's stem
    path: str  # absolute path of the clip, or its URL
    source: str  # path relative to the videos folder, as stored in the sample's json
    labels: dict[str, float | str]
    transcript: str | None  # imported from --transcripts; None: recognise it (or leave it empty)
    filename_note: str | None = None  # how a Filename with spaces around it was matched


@dataclass(frozen=True)
class Failure:
    path: str  # the clip, relative to the videos folder, or the Filename as the CSV gives it
    reason: str
    line: int | None = None  # labels CSV line, for failures found in a row
    key: str | None = None  # clip id, for failures found while building the clip

    def to_json(self) -> dict:
        record = {"path": self.path, "reason": self.reason}
        if self.line is not None:
            record["line"] = self.line
        if self.key is not None:
            record["key"] = self.key
        return record

    @classmethod
    def from_json(cls, record: dict) -> Failure:
        return cls(path=record["path"], reason=record["reason"], line=record.get("line"), key=record.get("key"))


def check_videos_folder(videos: Path) -> None:
    """UsageError unless `videos` (a local --videos) is a folder, saying what it is instead."""
    if videos.is_file():
        raise UsageError(f"--videos {videos}: a file, not a folder of clips (give the folder that holds it)")
    if not videos.is_dir():
        raise UsageError(f"--videos {videos}: no such folder")


def may_be_clip(path: PurePath) -> bool:
    """Whether a file of a videos folder is taken for a clip: every file but hidden ones and NOT_CLIPS."""
    return not path.name.startswith(".") and path.suffix.lower() not in NOT_CLIPS


def escape_reason(path: Path, folder: Path) -> str | None:
    """Why a file named inside a videos folder leads outside it (a symlink, to a file or through a folder), None
    when it does not: the rule of both `emi shards build` and `emi predict --videos`."""
    target = path.resolve()
    return None if target.is_relative_to(folder.resolve()) else f"escapes the videos folder (a symlink to {target})"


class ClipFinder:
    """Resolves Filename values inside one local folder; remembers which files were named."""

    def __init__(self, videos: Path):
        self.videos = Path(os.path.normpath(videos))
        self.root = Path(videos).resolve()
        self.named: set[PurePath] = set()
        self._stems: dict[PurePath, dict[str, list[PurePath]]] = {}

    # The file system, as the finder sees it; RemoteClipFinder answers the same from an object listing.
    def entries(self, folder: PurePath) -> list[PurePath]:
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def lexists(self, path: PurePath) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: PurePath) -> bool:
        return path.is_dir()

    def is_file(self, path: PurePath) -> bool:
        return path.is_file()

    def escape(self, path: PurePath) -> str | None:
        """Why a path that lies in the folder leads outside it (a symlink), None when it does not."""
        return escape_reason(Path(path), self.root)

    def location(self, path: PurePath) -> str:
        """What decoding opens: an absolute path (or a URL)."""
        return str(path.resolve())

    def _files_by_stem(self, folder: PurePath) -> dict[str, list[PurePath]]:
        if folder not in self._stems:
            index: dict[str, list[PurePath]] = {}
            for entry in self.entries(folder):
                if not entry.name.startswith("."):
                    index.setdefault(entry.stem, []).append(entry)
            self._stems[folder] = index
        return self._stems[folder]

    def find(self, filename: str) -> tuple[PurePath, str | None]:
        """The clip a Filename names, as a path under the videos folder, and a note when the Filename has spaces
        around it (matched as written, or only stripped); ValueError with the reason if none."""
        stripped = filename.strip()
        if stripped == filename:
            return self._find(filename), None
        try:
            return self._find(filename), f"Filename {filename!r} matched as written, spaces included"
        except ValueError:
            pass
        return self._find(stripped), f"Filename {filename!r} matched {stripped!r}, without its surrounding spaces"

    def _find(self, filename: str) -> PurePath:
        if not filename:
            raise ValueError("empty Filename")
        if os.path.isabs(filename):
            raise ValueError("absolute path: Filename must be relative to the videos folder")
        exact = type(self.videos)(os.path.normpath(self.videos / filename))
        if not exact.is_relative_to(self.videos):
            raise ValueError("escapes the videos folder ('..' leads outside it)")
        if self.lexists(exact) and not self.is_dir(exact):
            candidates = [exact]
        else:  # a Filename without its extension; one with a dot in it (`a..b`) is the stem of `a..b.mpg`
            stems = self._files_by_stem(exact.parent)
            candidates = stems.get(exact.stem, []) or stems.get(exact.name, [])
        if not candidates:
            if self.is_dir(exact):
                raise ValueError("a folder, not a clip")
            raise ValueError("clip not found in the videos folder")
        self.named.update(candidates)
        if len(candidates) > 1:
            raise ValueError(f"ambiguous: several files match ({', '.join(c.name for c in candidates)})")
        clip = candidates[0]
        if (escape := self.escape(clip)) is not None:
            raise ValueError(escape)
        if self.is_dir(clip):
            raise ValueError("a folder, not a clip")
        if not self.is_file(clip):
            raise ValueError("not a regular file (a broken symlink, a device or a pipe)")
        return clip


class RemoteClipFinder(ClipFinder):
    """The same over the objects under a URL prefix (s3://bucket/videos, any fsspec URL), listed once: its folders
    are the objects' key prefixes, and no object leads outside it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.videos = PurePosixPath("/videos")  # a stand-in root: '..' past it shows as leaving it
        self.files = {self.videos / name for name in storage.list_tree(self.url)}
        if not self.files:
            raise UsageError(f"--videos {storage.shown(url)}: no objects under this prefix")
        self.folders = {parent for path in self.files for parent in path.parents if parent.is_relative_to(self.videos)}
        self.named, self._stems = set(), {}

    def entries(self, folder: PurePath) -> list[PurePath]:
        return sorted(path for path in self.files | self.folders if path.parent == folder and path != folder)

    def lexists(self, path: PurePath) -> bool:
        return path in self.files or path in self.folders

    def is_dir(self, path: PurePath) -> bool:
        return path in self.folders

    def is_file(self, path: PurePath) -> bool:
        return path in self.files

    def escape(self, path: PurePath) -> str | None:
        return None

    def location(self, path: PurePath) -> str:
        return f"{self.url}/{path.relative_to(self.videos).as_posix()}"


def plan_clips(
    videos: str | Path, table: LabelTable, transcripts: dict[str, str], outputs: re.Pattern[str] | None = None
) -> tuple[list[ClipJob], list[Failure]]:
    """Clips to build sorted by key, and failures: bad rows in CSV order, then unnamed media files by name. `videos`
    is a local folder or a URL prefix. `outputs`: the names of the build's own shards where it writes into the
    videos folder itself; they are never taken for clips."""
    finder = RemoteClipFinder(videos) if storage.is_url(videos) else ClipFinder(Path(videos))
    jobs: dict[str, ClipJob] = {}
    lines: dict[str, int] = {}  # clip id -> the row that named it, for duplicate checks
    sources: dict[str, str] = {}
    failures = []
    for row in table.rows:
        try:
            clip, note = finder.find(row.filename)
            if outputs is not None and outputs.fullmatch(clip.name):
                raise ValueError("one of this build's own shards (--out is the videos folder), not a clip")
        except ValueError as err:
            failures.append(Failure(path=row.filename, reason=str(err), line=row.line))
            continue
        source = clip.relative_to(finder.videos).as_posix()
        key = clip.stem
        if "." in key:
            failures.append(
                Failure(
                    path=source,
                    line=row.line,
                    reason=f"clip id {key!r} contains '.', which WebDataset reads as the start of the extension",
                )
            )
            continue
        if key in sources:
            raise UsageError(
                f"{table.path}: lines {lines[key]} and {row.line} both name clip id {key!r} "
                f"({sources[key]} and {source})"
            )
        lines[key], sources[key] = row.line, source
        try:
            labels = parse_labels(row, table.kinds)
        except ValueError as err:
            failures.append(Failure(path=source, reason=str(err), line=row.line))
            continue
        jobs[key] = ClipJob(
            key=key,
            path=finder.location(clip),
            source=source,
            labels=labels,
            transcript=transcripts.get(key),
            filename_note=note,
        )
    for entry in finder.entries(finder.videos):
        if (
            not may_be_clip(entry)
            or entry in finder.named
            or not finder.is_file(entry)
            or (outputs is not None and outputs.fullmatch(entry.name))
        ):
            continue
        failures.append(Failure(path=entry.name, reason=f"no row in {table.path.name}: clip has no labels"))
    return [jobs[key] for key in sorted(jobs)], failures
