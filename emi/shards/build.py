"""`emi shards build`: clips + labels CSV -> `<split>-NNNNNN.tar` shards, manifest.json and failures.jsonl.

Clips are sorted by key and chunked into shards of --shard-size in that order, before decoding, so a shard's
clips never depend on what failed elsewhere (a clip that fails leaves its shard one sample short).
Workers decode, encode and write each clip's tar members to a part file in `<out>/.emi-parts` (streamed: memory
does not grow with a clip's length); the parent appends the parts to each shard in order under a temporary name,
renames it when complete, then rewrites failures.jsonl and manifest.json atomically. A re-run with the same
arguments keeps every shard whose bytes still match the manifest and builds the rest; different arguments rebuild
everything. A write that fails (a full disk) stops the build with StoppedError, leaving the complete shards listed
in the manifest and no temporary file: the re-run continues from there.
"""
from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from emi.errors import StoppedError, UsageError
from emi.io import sha256_file, write_atomic
from emi.manifest import (
    CLIP_SHARDS, MANIFEST_FILE, Manifest, Preprocessing, ShardEntry, find_manifest, write_manifest)
from emi.shards.asr import check_whisper, parse_asr, read_transcripts
from emi.shards.labels import read_labels
from emi.shards.files import FAILURES, ShardWriter, read_failures, read_sample_metadata, shard_name, shard_pattern
from emi.shards.plan import ClipJob, Failure, SampleOptions, plan_clips

PARTS = ".emi-parts"  # the workers' part files, inside --out
CLIPS_AHEAD_PER_WORKER = 4  # bounds the part files waiting on disk behind a slow clip


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    split: str
    num_samples: int
    num_failed: int
    num_shards: int
    shards_written: int
    shards_kept: int
    rebuild_reason: str | None  # why shards of an earlier build were not kept, None if none were thrown away

    def describe(self) -> str:
        lines = [self.rebuild_reason] if self.rebuild_reason else []
        lines.append(f"{self.num_samples} samples in {self.num_shards} {self.split} shard(s) in {self.out} "
                     f"({self.shards_written} written, {self.shards_kept} kept from an earlier build)")
        if self.num_failed:
            lines.append(f"{self.num_failed} clip(s) not built: reasons in {self.out / FAILURES}")
        return "\n".join(lines)


def _check_arguments(videos: Path, out: Path, split: str, fps: float, sample_rate: int, frame_size: int,
                     shard_size: int, workers: int, face_crop: str) -> None:
    if not videos.is_dir():
        raise UsageError(f"--videos {videos}: no such folder")
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UsageError(f"--out {out}: {folder} exists and is not a folder")
            break
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", split):
        raise UsageError(f"--split {split!r}: use letters, digits, '_' and '-' (it names the shard files)")
    if not fps > 0:
        raise UsageError(f"--fps must be positive, got {fps}")
    if sample_rate < 1000:
        raise UsageError(f"--sample-rate must be at least 1000 Hz, got {sample_rate}")
    if frame_size < 16 or frame_size % 2:
        raise UsageError(f"--frame-size must be an even number of at least 16, got {frame_size}")
    if shard_size < 1 or workers < 1:
        raise UsageError(f"--shard-size and --workers must be at least 1, got {shard_size} and {workers}")
    if face_crop not in ("none", "opencv"):
        raise UsageError(f"--face-crop must be 'none' or 'opencv', got {face_crop!r}")


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One build at a time per output folder: two would delete each other's temporary shards."""
    with open(out / ".emi-shards.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out {out}: another build is writing there") from None
        yield


def _reusable_shards(out: Path, split: str, args: dict, chunks: list[list[ClipJob]]
                     ) -> tuple[dict[int, ShardEntry], list[Failure], str | None]:
    """Shards of an earlier build to keep (by index), the failures recorded for their missing clips, and why
    the earlier build was thrown away (None when it was not)."""
    try:
        old = find_manifest(out)
    except UsageError as err:
        return {}, [], f"{err}: rebuilding all shards"
    if old is None:
        foreign = sorted(path.name for path in out.iterdir() if shard_pattern(split).fullmatch(path.name))
        if foreign:  # never delete shards this tool did not write
            raise UsageError(f"--out {out} has shards but no {MANIFEST_FILE} ({', '.join(foreign[:3])}, ...): "
                             "remove them or choose another folder")
        return {}, [], None
    if old.format != CLIP_SHARDS:
        return {}, [], f"{old.path} is a {old.format} manifest: rebuilding all shards"
    if old.split != split:
        raise UsageError(f"--out {out} holds the {old.split!r} split: give each split its own folder")
    if old.args != args:
        old_args = old.args or {}
        changed = "; ".join(f"{name}: {old_args.get(name)!r} -> {value!r}" for name, value in args.items()
                            if old_args.get(name) != value)
        return {}, [], f"arguments differ from the earlier build in {out} ({changed}): rebuilding all shards"
    old_entries = {entry.name: entry for entry in old.shards}
    try:
        records = read_failures(out)
    except ValueError:  # then shards with failed clips cannot be vouched for, and are rebuilt
        records = []
    old_failures = {record["key"]: Failure.from_json(record) for record in records if "key" in record}
    kept, carried = {}, []
    for index, chunk in enumerate(chunks):
        entry = old_entries.get(shard_name(split, index))
        if entry is None:
            continue
        built = set(entry.keys)
        planned = [job.key for job in chunk]
        missing = [key for key in planned if key not in built]
        path = out / entry.name
        if ([key for key in planned if key in built] == entry.keys and all(key in old_failures for key in missing)
                and path.is_file() and path.stat().st_size == entry.bytes and sha256_file(path) == entry.sha256):
            kept[index] = entry
            carried += [old_failures[key] for key in missing]
    return kept, carried, None


_WORKER_BUILDER = None  # a worker process's SampleBuilder


def _exit_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the process that started it dies (Linux), so that killing the
    builder never leaves workers decoding on their own; elsewhere they notice at their next task."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _init_worker(options: SampleOptions, parts: Path, parent: int) -> None:
    """Pool initializer: die with the parent, load the models once per worker process."""
    global _WORKER_BUILDER
    _exit_with_parent(parent)
    from emi.shards.sample import SampleBuilder

    _WORKER_BUILDER = SampleBuilder(options, parts)


def _build_in_worker(job: ClipJob):
    return _WORKER_BUILDER(job)


def _samples(jobs: list[ClipJob], options: SampleOptions, workers: int, parts: Path) -> Iterator:
    """Built samples (emi.shards.sample.Sample) or Failures of the clips in order, from this process or a pool of
    `workers` processes. Decoding is imported only where it runs: the parent starts faster without it."""
    if workers == 1:
        from emi.shards.sample import SampleBuilder

        builder = SampleBuilder(options, parts)
        for job in jobs:
            yield builder(job)
        return
    # spawn: forking a process that may have imported torch can hang
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(options, parts, os.getpid()))
    try:
        pending = deque()
        for job in jobs:
            pending.append(pool.submit(_build_in_worker, job))
            if len(pending) >= CLIPS_AHEAD_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def build_shards(videos: str | Path, labels: str | Path, out: str | Path, split: str = "train", fps: float = 5.0,
                 sample_rate: int = 16000, frame_size: int = 256, shard_size: int = 256, workers: int = 1,
                 asr: str = "none", transcripts: str | Path | None = None, face_crop: str = "none") -> BuildSummary:
    videos, labels, out = Path(videos), Path(labels), Path(out)
    _check_arguments(videos, out, split, fps, sample_rate, frame_size, shard_size, workers, face_crop)
    asr_model = parse_asr(asr)
    if asr_model is not None:
        check_whisper(asr_model)
    if face_crop == "opencv":
        from emi.shards.face import load_face_detector

        load_face_detector()
    table = read_labels(labels)
    imported = read_transcripts(transcripts) if transcripts is not None else {}
    jobs, failures = plan_clips(videos, table, imported)
    args = {
        "videos": str(videos.resolve()), "labels": str(labels.resolve()), "labels_sha256": sha256_file(labels),
        "split": split, "fps": float(fps), "sample_rate": sample_rate, "frame_size": frame_size,
        "shard_size": shard_size, "asr": asr,
        "transcripts": str(Path(transcripts).resolve()) if transcripts is not None else None,
        "transcripts_sha256": sha256_file(Path(transcripts)) if transcripts is not None else None,
        "face_crop": face_crop,
    }
    # the workers share the cores: each decoder gets its share of them as threads
    options = SampleOptions(split=split, fps=float(fps), sample_rate=sample_rate, frame_size=frame_size,
                            asr_model=asr_model, face_crop=face_crop == "opencv",
                            decoder_threads=max(1, (os.cpu_count() or 1) // workers))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    with _exclusive(out):
        parts = out / PARTS
        try:
            shutil.rmtree(parts, ignore_errors=True)  # what a killed build left
            parts.mkdir()
            return _build(out, jobs, failures, table.kinds, args, options, shard_size, workers, parts)
        except OSError as err:
            complete = _complete_shards(out)
            raise StoppedError(
                f"cannot write in {out} ({err.strerror}{f': {err.filename}' if err.filename else ''}); the build "
                f"stopped with {complete} complete shard(s) listed in {MANIFEST_FILE}: free space (or fix the folder) "
                "and run the same command again to continue") from None
        finally:
            shutil.rmtree(parts, ignore_errors=True)


def _complete_shards(out: Path) -> int:
    try:
        manifest = find_manifest(out)
    except UsageError:
        return 0
    return len(manifest.shards) if manifest else 0


def _build(out: Path, jobs: list[ClipJob], failures: list[Failure], kinds: dict[str, str], args: dict,
           options: SampleOptions, shard_size: int, workers: int, parts: Path) -> BuildSummary:
    split = options.split
    preprocessing = Preprocessing.from_dict(args)  # the arguments that decide what a sample holds
    chunks = [jobs[start:start + shard_size] for start in range(0, len(jobs), shard_size)]
    entries, carried, rebuild_reason = _reusable_shards(out, split, args, chunks)
    if rebuild_reason:
        print(f"emi: {rebuild_reason}", file=sys.stderr)
    build_failures = {failure.key: failure for failure in carried}
    totals = {}  # shard index -> (frames, seconds)
    for index, entry in entries.items():
        metadata = read_sample_metadata(out / entry.name)
        totals[index] = (sum(m["num_frames"] for m in metadata), sum(m["duration_s"] for m in metadata))

    def save_state() -> None:
        # failures first: a manifest never lists a shard whose failed clips are not on record
        records = failures + [build_failures[key] for key in sorted(build_failures)]
        lines = [json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records]
        write_atomic(out / FAILURES, "".join(lines).encode())
        indices = sorted(entries)
        write_manifest(out, Manifest(
            format=CLIP_SHARDS, split=split, shards=[entries[index] for index in indices], labels=kinds,
            preprocessing=preprocessing, num_frames=sum(totals[index][0] for index in indices),
            duration_s=round(sum(totals[index][1] for index in indices), 6), args=args))

    save_state()
    kept_names = {entry.name for entry in entries.values()}
    pattern = shard_pattern(split)
    for path in out.iterdir():  # shards not kept, and what a killed build left half-written
        stale_shard = pattern.fullmatch(path.name) and path.name not in kept_names
        half_written = path.name.startswith(".") and path.name.endswith(".tmp") and pattern.fullmatch(path.name[1:-4])
        if stale_shard or half_written:
            path.unlink()

    to_build = [index for index in range(len(chunks)) if index not in entries]
    build_jobs = [job for index in to_build for job in chunks[index]]
    samples = _samples(build_jobs, options, min(workers, max(1, len(build_jobs))), parts)
    with tqdm(total=len(build_jobs), unit="clip", desc=f"{split} shards", file=sys.stderr) as progress:
        for index in to_build:
            writer = ShardWriter(out / shard_name(split, index))
            try:
                frames, seconds = 0, 0.0
                for _ in chunks[index]:
                    result = next(samples)
                    progress.update()
                    if isinstance(result, Failure):
                        build_failures[result.key] = result
                        continue
                    writer.add_part(result.key, result.part)
                    frames += result.num_frames
                    seconds += result.duration_s
                entries[index] = writer.finish()
            except BaseException:
                writer.abort()
                samples.close()
                raise
            totals[index] = (frames, seconds)
            save_state()

    return BuildSummary(out=out, split=split, num_samples=sum(entry.num_samples for entry in entries.values()),
                        num_failed=len(failures) + len(build_failures), num_shards=len(chunks),
                        shards_written=len(to_build), shards_kept=len(chunks) - len(to_build),
                        rebuild_reason=rebuild_reason)

