"""`emi shards build`: clips + labels CSV -> `<split>-NNNNNN.tar` shards, manifest.json and failures.jsonl.

Clips are sorted by key and chunked into shards of --shard-size in that order, before decoding, so a shard's
clips never depend on what failed elsewhere (a clip that fails leaves its shard one sample short).
Workers decode, encode and write each clip's tar members to a part file in `<out>/.emi-parts` (streamed: memory
does not grow with a clip's length); the parent appends the parts to each shard in order under a temporary name,
renames it when complete, then rewrites failures.jsonl and manifest.json atomically. A re-run with the same
arguments keeps every shard whose bytes still match the manifest and builds the rest; different arguments rebuild
everything. A write that fails (a full disk) stops the build with StoppedError, leaving the complete shards listed
in the manifest and no temporary file: the re-run continues from there.

--out may be a URL (s3://bucket/prefix, any fsspec file system): shards are then written in a local temporary
folder and uploaded whole when complete, so a killed build leaves no partial object, and the manifest is uploaded
after them. --videos may be a URL prefix too: the objects under it are listed once, and each clip is downloaded by
its worker next to its part file, decoded, and deleted.

A job array (--num-tasks N --task-index I, defaulting inside a Slurm array to SLURM_ARRAY_TASK_COUNT and
SLURM_ARRAY_TASK_ID) splits the shards, and so the sorted clip list, into N contiguous, disjoint slices: task I builds
only its slice, under the same shard names a single build gives them, and writes a partial manifest
(emi.formats.manifest: `.emi-tasks/task-IIIII-of-NNNNN.json`, its failures inside) instead of manifest.json and
failures.jsonl; `emi shards merge` (emi.shards.merge) then writes those two. A re-run task keeps its complete
shards as a single build does.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from emi import storage
from emi.errors import StoppedError, UsageError
from emi.formats.manifest import (
    CLIP_SHARDS,
    MANIFEST_FILE,
    BuildArgs,
    Manifest,
    ShardEntry,
    TaskPart,
    find_manifest,
    partial_manifest_name,
    read_manifest,
    write_manifest,
)
from emi.io import sha256_file
from emi.shards.asr import check_whisper, parse_asr, read_transcripts
from emi.shards.files import FAILURES, ShardWriter, failure_lines, read_failures, scan_shard, shard_name, shard_pattern
from emi.shards.labels import read_labels
from emi.shards.plan import ClipJob, Failure, SampleOptions, check_videos_folder, plan_clips

PARTS = ".emi-parts"  # the workers' part files, inside --out (a local one) or a local temporary folder
CLIPS_AHEAD_PER_WORKER = 4  # bounds the part files waiting on disk behind a slow clip


@dataclass(frozen=True)
class ArrayTask:
    index: int
    count: int


def array_task(num_tasks: int | None, task_index: int | None) -> ArrayTask | None:
    """This process's task of a job-array build, None for a single build. Inside a Slurm array each missing
    argument defaults: the count to SLURM_ARRAY_TASK_COUNT, the index to SLURM_ARRAY_TASK_ID (so an array is
    numbered from 0, and re-running some of its tasks is `sbatch --array=2,5 ... --num-tasks N`)."""
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        try:
            if num_tasks is None:
                num_tasks = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
            if task_index is None:
                task_index = int(os.environ["SLURM_ARRAY_TASK_ID"])
        except (KeyError, ValueError):
            raise UsageError(
                "inside a Slurm array without SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID numbers: "
                "pass --num-tasks and --task-index"
            ) from None
    if num_tasks is None and task_index is None:
        return None
    if num_tasks is None or task_index is None:
        raise UsageError("--num-tasks and --task-index go together (outside a Slurm array)")
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise UsageError(
            f"--task-index {task_index} --num-tasks {num_tasks}: need 0 <= index < tasks (a Slurm "
            "array for this build is numbered from 0: --array=0-<tasks - 1>)"
        )
    return ArrayTask(task_index, num_tasks)


def task_shards(num_shards: int, task: ArrayTask | None) -> range:
    """The shard indices a task owns: contiguous, disjoint, sizes differing by at most one; all without a task."""
    if task is None:
        return range(num_shards)
    return range(task.index * num_shards // task.count, (task.index + 1) * num_shards // task.count)


def shard_index(name: str, split: str) -> int | None:
    return int(name[len(split) + 1 : -4]) if shard_pattern(split).fullmatch(name) else None


@dataclass(frozen=True)
class BuildSummary:
    out: str | Path
    split: str
    num_samples: int
    num_failed: int
    num_shards: int
    shards_written: int
    shards_kept: int
    rebuild_reason: str | None  # why shards of an earlier build were not kept, None if none were thrown away
    task: ArrayTask | None = None

    def describe(self) -> str:
        lines = [self.rebuild_reason] if self.rebuild_reason else []
        who = f"task {self.task.index} of {self.task.count}: " if self.task else ""
        out = storage.shown(self.out)
        lines.append(
            f"{who}{self.num_samples} samples in {self.num_shards} {self.split} shard(s) in {out} "
            f"({self.shards_written} written, {self.shards_kept} kept from an earlier build)"
        )
        if self.num_failed:
            where = (
                storage.join(out, partial_manifest_name(self.task.index, self.task.count))
                if self.task
                else storage.join(out, FAILURES)
            )
            lines.append(f"{self.num_failed} clip(s) not built: reasons in {where}")
        if self.task:
            lines.append(f"when every task is done: emi shards merge {out}")
        return "\n".join(lines)


def _check_arguments(
    videos: str | Path,
    out: str | Path,
    split: str,
    fps: float,
    sample_rate: int,
    frame_size: int,
    shard_size: int,
    workers: int,
    face_crop: str,
) -> None:
    if not storage.is_url(videos):  # a URL prefix is listed (and checked) by the plan
        check_videos_folder(videos)
    if not storage.is_url(out):
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
def _exclusive(out: Path, task: ArrayTask | None) -> Iterator[None]:
    """One build at a time per output folder (per task of an array): two would delete each other's temporary
    shards."""
    name = ".emi-shards.lock" if task is None else f".emi-shards-task-{task.index}.lock"
    with open(out / name, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out {out}: another build is writing there") from None
        yield


def _previous_build(
    out: str | Path, split: str, args: BuildArgs, task: ArrayTask | None, owned: range
) -> tuple[Manifest | None, list[dict], str | None]:
    """What an earlier build left in `out` for these shards: its manifest (a task's own partial one, else the
    folder's), its failure records, and why it cannot be used (None when it can, or when there is none)."""
    partial = storage.join(out, partial_manifest_name(task.index, task.count)) if task else None
    try:
        old = read_manifest(partial) if partial is not None and storage.exists(partial) else find_manifest(out)
    except UsageError as err:
        return None, [], f"{err}: rebuilding all shards"
    if old is None:
        foreign = [name for name in storage.list_names(out) if shard_index(name, split) in owned]
        if foreign:  # never delete shards this tool did not write
            raise UsageError(
                f"--out {storage.shown(out)} has shards but no {MANIFEST_FILE} "
                f"({', '.join(foreign[:3])}, ...): remove them or choose another folder"
                + (" (or run the array with the --num-tasks that wrote them)" if task else "")
            )
        return None, [], None
    if old.format != CLIP_SHARDS:
        return None, [], f"{old.path} is a {old.format} manifest: rebuilding all shards"
    if old.split != split:
        raise UsageError(f"--out {storage.shown(out)} holds the {old.split!r} split: give each split its own folder")
    if old.args != args:
        old_args = old.args.to_dict() if old.args is not None else {}
        changed = "; ".join(
            f"{name}: {old_args.get(name)!r} -> {value!r}"
            for name, value in args.to_dict().items()
            if old_args.get(name) != value
        )
        return (
            None,
            [],
            (f"arguments differ from the earlier build in {storage.shown(out)} ({changed}): rebuilding all shards"),
        )
    if old.failures is not None:
        return old, old.failures, None
    try:
        return old, read_failures(out), None
    except ValueError:  # then shards with failed clips cannot be vouched for, and are rebuilt
        return old, [], None


def _reusable_shards(
    out: str | Path, old: Manifest, records: list[dict], chunks: list[list[ClipJob]], owned: range
) -> tuple[dict[int, ShardEntry], dict[int, tuple[int, float]], list[Failure]]:
    """Shards of an earlier build to keep (by index), their (frames, seconds) totals, and the failures recorded for
    their missing clips. A shard is kept when it holds the planned clips but the recorded failures, and its bytes
    still hash to the manifest's sha256."""
    old_entries = {entry.name: entry for entry in old.shards}
    old_failures = {record["key"]: Failure.from_json(record) for record in records if "key" in record}
    kept, totals, carried = {}, {}, []
    for index in owned:
        entry = old_entries.get(shard_name(old.split, index))
        if entry is None:
            continue
        built = set(entry.keys)
        planned = [job.key for job in chunks[index]]
        missing = [key for key in planned if key not in built]
        location = storage.join(out, entry.name)
        if (
            [key for key in planned if key in built] != entry.keys
            or not all(key in old_failures for key in missing)
            or storage.size(location) != entry.bytes
        ):
            continue
        try:
            scan = scan_shard(location)
        except ValueError:
            continue
        if scan.sha256 == entry.sha256:
            kept[index] = entry
            totals[index] = (sum(m["num_frames"] for m in scan.metadata), sum(m["duration_s"] for m in scan.metadata))
            carried += [old_failures[key] for key in missing]
    return kept, totals, carried


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
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(options, parts, os.getpid())
    )
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


def build_shards(
    videos: str | Path,
    labels: str | Path,
    out: str | Path,
    split: str = "train",
    fps: float = 5.0,
    sample_rate: int = 16000,
    frame_size: int = 256,
    shard_size: int = 256,
    workers: int = 1,
    asr: str = "none",
    transcripts: str | Path | None = None,
    face_crop: str = "none",
    num_tasks: int | None = None,
    task_index: int | None = None,
) -> BuildSummary:
    videos = str(videos) if storage.is_url(str(videos)) else Path(videos)
    labels = Path(labels)
    out = str(out) if storage.is_url(str(out)) else Path(out)
    task = array_task(num_tasks, task_index)
    _check_arguments(videos, out, split, fps, sample_rate, frame_size, shard_size, workers, face_crop)
    asr_model = parse_asr(asr)
    if asr_model is not None:
        check_whisper(asr_model)
    if face_crop == "opencv":
        from emi.shards.face import load_face_detector

        load_face_detector()
    table = read_labels(labels)
    imported = read_transcripts(transcripts) if transcripts is not None else {}
    writes_into_videos = not storage.is_url(videos) and not storage.is_url(out) and out.resolve() == videos.resolve()
    jobs, failures = plan_clips(videos, table, imported, shard_pattern(split) if writes_into_videos else None)
    args = _build_args(videos, labels, transcripts, split, fps, sample_rate, frame_size, shard_size, asr, face_crop)
    # the workers share the cores: each decoder gets its share of them as threads
    options = SampleOptions(
        split=split,
        fps=float(fps),
        sample_rate=sample_rate,
        frame_size=frame_size,
        asr_model=asr_model,
        face_crop=face_crop == "opencv",
        decoder_threads=max(1, (os.cpu_count() or 1) // workers),
    )
    staging, lock = _staging(out, task)
    with lock:
        parts = staging / (PARTS if task is None else f"{PARTS}-{task.index}")
        try:
            shutil.rmtree(parts, ignore_errors=True)  # what a killed build left
            parts.mkdir()
            return _build(out, staging, task, jobs, failures, table.kinds, args, options, workers, parts)
        except OSError as err:
            complete = _complete_shards(out, task)
            reason = f"{err.strerror}{f': {err.filename}' if err.filename else ''}" if err.strerror else str(err)
            raise StoppedError(
                f"cannot write in {storage.shown(out)} ({reason}); the build stopped with {complete} complete "
                f"shard(s) listed in its manifest: free space (or fix the folder) and run the same command again "
                "to continue"
            ) from None
        finally:
            shutil.rmtree(parts, ignore_errors=True)
            if staging != out:
                shutil.rmtree(staging, ignore_errors=True)


def _build_args(
    videos: str | Path,
    labels: Path,
    transcripts: str | Path | None,
    split: str,
    fps: float,
    sample_rate: int,
    frame_size: int,
    shard_size: int,
    asr: str,
    face_crop: str,
) -> BuildArgs:
    """The build's arguments as its manifest records them: absolute paths, the label and transcript files' hashes."""
    return BuildArgs(
        videos=storage.shown(videos) if storage.is_url(videos) else str(videos.resolve()),
        labels=str(labels.resolve()),
        labels_sha256=sha256_file(labels),
        split=split,
        fps=float(fps),
        sample_rate=sample_rate,
        frame_size=frame_size,
        shard_size=shard_size,
        asr=asr,
        transcripts=str(Path(transcripts).resolve()) if transcripts is not None else None,
        transcripts_sha256=sha256_file(Path(transcripts)) if transcripts is not None else None,
        face_crop=face_crop,
    )


def _staging(out: str | Path, task: ArrayTask | None):
    """(where shards are written, the lock the build holds): the output folder itself under an exclusive lock, or
    for a URL a local temporary folder whose complete shards go up one by one."""
    if storage.is_url(out):
        return Path(tempfile.mkdtemp(prefix="emi-shards-")), nullcontext()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    return out, _exclusive(out, task)


def _complete_shards(out: str | Path, task: ArrayTask | None) -> int:
    try:
        manifest = (
            read_manifest(storage.join(out, partial_manifest_name(task.index, task.count)))
            if task
            else find_manifest(out)
        )
    except UsageError:
        return 0
    return len(manifest.shards) if manifest else 0


@dataclass
class _BuildState:
    """What a build (or one array task of it) has on record: the shards it owns and those done, each done shard's
    frames and seconds, the clips that failed in planning and while building. `save` writes it out: the manifest,
    or the task's partial manifest, and the failures."""

    out: str | Path
    task: ArrayTask | None
    owned: range
    kinds: dict[str, str]
    args: BuildArgs
    plan_failures: list[Failure]
    entries: dict[int, ShardEntry]
    totals: dict[int, tuple[int, float]]
    build_failures: dict[str, Failure]

    def save(self) -> None:
        # failures first (or with the shards, in a partial manifest): a manifest never lists a shard whose failed
        # clips are not on record
        failed = self.plan_failures + [self.build_failures[key] for key in sorted(self.build_failures)]
        records = [record.to_json() for record in failed]
        indices = sorted(self.entries)
        manifest = Manifest(
            format=CLIP_SHARDS,
            split=self.args.split,
            shards=[self.entries[index] for index in indices],
            labels=self.kinds,
            preprocessing=self.args.preprocessing,  # the arguments that decide what a sample holds
            num_frames=sum(self.totals[index][0] for index in indices),
            duration_s=round(sum(self.totals[index][1] for index in indices), 6),
            args=self.args,
        )
        if self.task is None:
            storage.write_bytes(storage.join(self.out, FAILURES), failure_lines(records))
            write_manifest(self.out, manifest)
            return
        manifest.task = TaskPart(
            index=self.task.index,
            count=self.task.count,
            first_shard=self.owned.start,
            num_shards=len(self.owned),
            complete=len(self.entries) == len(self.owned),
        )
        manifest.failures = records
        write_manifest(self.out, manifest, partial_manifest_name(self.task.index, self.task.count))

    def remove_stale(self) -> None:
        """This build's shards that are not kept, and what a killed build left half-written; a task leaves the
        other tasks' shards alone."""
        kept = {entry.name for entry in self.entries.values()}

        def ours(name: str) -> bool:
            index = shard_index(name, self.args.split)
            return index is not None and (self.task is None or index in self.owned)

        for name in storage.list_names(self.out):
            half_written = name.startswith(".") and name.endswith(".tmp") and ours(name[1:-4])
            if (ours(name) and name not in kept) or half_written:
                storage.remove(storage.join(self.out, name))


def _build(
    out: str | Path,
    staging: Path,
    task: ArrayTask | None,
    jobs: list[ClipJob],
    failures: list[Failure],
    kinds: dict[str, str],
    args: BuildArgs,
    options: SampleOptions,
    workers: int,
    parts: Path,
) -> BuildSummary:
    chunks = [jobs[start : start + args.shard_size] for start in range(0, len(jobs), args.shard_size)]
    owned = task_shards(len(chunks), task)
    old, records, rebuild_reason = _previous_build(out, args.split, args, task, owned)
    entries, totals, carried = _reusable_shards(out, old, records, chunks, owned) if old else ({}, {}, [])
    if rebuild_reason:
        print(f"emi: {rebuild_reason}", file=sys.stderr)
    state = _BuildState(out, task, owned, kinds, args, failures, entries, totals, {f.key: f for f in carried})
    state.save()
    state.remove_stale()
    to_build = [index for index in owned if index not in entries]
    build_jobs = [job for index in to_build for job in chunks[index]]
    samples = _samples(build_jobs, options, min(workers, max(1, len(build_jobs))), parts)
    with tqdm(total=len(build_jobs), unit="clip", desc=f"{args.split} shards", file=sys.stderr) as progress:
        for index in to_build:
            _write_shard(state, index, len(chunks[index]), samples, staging, progress)
    return BuildSummary(
        out=out,
        split=args.split,
        num_samples=sum(entry.num_samples for entry in entries.values()),
        num_failed=len(failures) + len(state.build_failures),
        num_shards=len(owned),
        shards_written=len(to_build),
        shards_kept=len(owned) - len(to_build),
        rebuild_reason=rebuild_reason,
        task=task,
    )


def _write_shard(
    state: _BuildState, index: int, num_clips: int, samples: Iterator, staging: Path, progress: tqdm
) -> None:
    """The next `num_clips` results of `samples` into shard `index` (uploaded whole where the output is a URL),
    then the state saved with it."""
    writer = ShardWriter(staging / shard_name(state.args.split, index))
    try:
        frames, seconds = 0, 0.0
        for _ in range(num_clips):
            result = next(samples)
            progress.update()
            if isinstance(result, Failure):
                state.build_failures[result.key] = result
                continue
            writer.add_part(result.key, result.part)
            frames += result.num_frames
            seconds += result.duration_s
        entry = writer.finish()
        if staging != state.out:  # uploaded whole: no partial object ever appears
            storage.upload(writer.path, storage.join(state.out, entry.name))
            writer.path.unlink()
    except BaseException:
        writer.abort()
        samples.close()
        raise
    state.entries[index] = entry
    state.totals[index] = (frames, seconds)
    state.save()
