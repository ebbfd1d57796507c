"""`emi shards merge OUT`: the partial manifests of a job-array build -> the one manifest.json and failures.jsonl.

Every task's partial manifest (emi.formats.manifest, `.emi-tasks/` in OUT) is checked: all tasks of the array are there
and complete, they were run with the same arguments, their shard ranges tile the whole build, every shard they list
still hashes to its sha256 and holds the samples listed, and no key comes twice. Then manifest.json and
failures.jsonl are written as a single build would have written them (same shards, same order, same totals, the
labels' failures first, then the clips' by key). When tasks are missing or incomplete nothing is written and the
summary names them, so that only those are run again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from emi import storage
from emi.errors import UsageError
from emi.formats.manifest import CLIP_SHARDS, TASKS_DIR, Manifest, read_manifest, write_manifest
from emi.shards.files import FAILURES, failure_lines, scan_shard

_PARTIAL = re.compile(r"task-(\d{5})-of-(\d{5})\.json")


@dataclass
class MergeSummary:
    out: str | Path
    num_tasks: int
    missing: list[int] = field(default_factory=list)  # tasks without a partial manifest
    incomplete: dict[int, str] = field(default_factory=dict)  # task -> why it must run again
    num_samples: int = 0
    num_shards: int = 0
    num_failed: int = 0

    @property
    def merged(self) -> bool:
        return not self.missing and not self.incomplete

    def describe(self) -> str:
        out = storage.shown(self.out)
        if not self.merged:
            lines = [
                f"{out}: not merged, {len(self.missing) + len(self.incomplete)} of {self.num_tasks} task(s) "
                "must run again:"
            ]
            lines += [f"  task {index}: missing (no partial manifest)" for index in self.missing]
            lines += [f"  task {index}: {reason}" for index, reason in sorted(self.incomplete.items())]
            rerun = ",".join(str(index) for index in sorted([*self.missing, *self.incomplete]))
            lines.append(
                f"re-run them with the same arguments and --num-tasks {self.num_tasks} (--task-index I for "
                f"I in {rerun}; in Slurm: sbatch --array={rerun} slurm/shards.sh ... --num-tasks "
                f"{self.num_tasks}), then merge again"
            )
            return "\n".join(lines)
        lines = [f"merged {self.num_tasks} task(s): {self.num_samples} samples in {self.num_shards} shard(s) in {out}"]
        if self.num_failed:
            lines.append(f"{self.num_failed} clip(s) not built: reasons in {storage.join(out, FAILURES)}")
        return "\n".join(lines)


def read_partials(out: str | Path) -> dict[int, Manifest]:
    """The partial manifests in OUT by task index; UsageError when there are none, or they are of several arrays."""
    folder = storage.join(out, TASKS_DIR)
    found = [
        (int(m.group(1)), int(m.group(2)), name)
        for name in storage.list_names(folder)
        if (m := _PARTIAL.fullmatch(name))
    ]
    if not found:
        raise UsageError(
            f"{storage.shown(out)}: no partial manifests in {TASKS_DIR}/ (build with --num-tasks N "
            "--task-index I, or inside a Slurm array, first)"
        )
    counts = sorted({count for _, count, _ in found})
    if len(counts) > 1:
        raise UsageError(
            f"{storage.shown(folder)}: partial manifests of arrays of {counts} tasks: remove those of "
            "the arrays you do not want merged"
        )
    partials = {}
    for index, _, name in found:
        partial = read_manifest(storage.join(folder, name))
        if partial.task is None or (partial.task.index, partial.task.count) != (index, counts[0]):
            raise UsageError(f"{storage.shown(storage.join(folder, name))}: its task does not match its name")
        partials[index] = partial
    return partials


def merge_shards(out: str | Path) -> MergeSummary:
    out = out if storage.is_url(str(out)) else Path(out)
    partials = read_partials(out)
    first = next(iter(partials.values()))
    count = first.task.count
    summary = MergeSummary(out=out, num_tasks=count, missing=[i for i in range(count) if i not in partials])
    for index, partial in partials.items():
        for name in ("args", "split", "labels", "preprocessing"):
            if getattr(partial, name) != getattr(first, name):
                raise UsageError(
                    f"{storage.shown(out)}: tasks {first.task.index} and {index} were run with "
                    f"different {name}: re-run the array with one set of arguments"
                )
    plan_failures = [record for record in first.failures if "key" not in record]
    for index, partial in sorted(partials.items()):
        if [record for record in partial.failures if "key" not in record] != plan_failures:
            raise UsageError(
                f"{storage.shown(out)}: tasks {first.task.index} and {index} saw different labels or "
                "videos (their failures differ): re-run the array on unchanged inputs"
            )
    expected_start = 0
    for index in range(count):  # the ranges tile [0, total) in task order
        partial = partials.get(index)
        if partial is None:
            continue
        if index > 0 and index - 1 in partials and partial.task.first_shard != expected_start:
            raise UsageError(
                f"{storage.shown(out)}: task {index} starts at shard {partial.task.first_shard}, "
                f"task {index - 1} ends at {expected_start}: the partial manifests are not of one build"
            )
        expected_start = partial.task.first_shard + partial.task.num_shards

    totals: dict[str, tuple[int, float]] = {}
    owner: dict[str, str] = {}  # key -> shard
    for index, partial in sorted(partials.items()):
        if not partial.task.complete:
            summary.incomplete[index] = f"incomplete: {len(partial.shards)} of {partial.task.num_shards} shard(s) built"
            continue
        for entry in partial.shards:
            problem = _check_shard(out, entry, totals)
            if problem is None:
                twice = [key for key in entry.keys if key in owner]
                if twice:
                    raise UsageError(
                        f"{storage.shown(out)}: key {twice[0]!r} is in {owner[twice[0]]} and in "
                        f"{entry.name}: the partial manifests are not of one build"
                    )
                owner.update((key, entry.name) for key in entry.keys)
            else:
                summary.incomplete[index] = problem
                break
    if not summary.merged:
        return summary

    ordered = sorted(partials.values(), key=lambda partial: partial.task.index)
    shards = [entry for partial in ordered for entry in partial.shards]
    keyed = {record["key"]: record for partial in ordered for record in partial.failures if "key" in record}
    records = plan_failures + [keyed[key] for key in sorted(keyed)]
    storage.write_bytes(storage.join(out, FAILURES), failure_lines(records))
    write_manifest(
        out,
        Manifest(
            format=CLIP_SHARDS,
            split=first.split,
            shards=shards,
            labels=first.labels,
            preprocessing=first.preprocessing,
            num_frames=sum(totals[entry.name][0] for entry in shards),
            duration_s=round(sum(totals[entry.name][1] for entry in shards), 6),
            args=first.args,
        ),
    )
    summary.num_samples = sum(entry.num_samples for entry in shards)
    summary.num_shards = len(shards)
    summary.num_failed = len(records)
    return summary


def _check_shard(out: str | Path, entry, totals: dict[str, tuple[int, float]]) -> str | None:
    """None when the shard is there with the bytes and samples its entry lists (its totals then go to `totals`),
    else why not."""
    try:
        scan = scan_shard(storage.join(out, entry.name))
    except ValueError as err:
        return f"shard {entry.name}: {err}"
    if (scan.sha256, scan.bytes) != (entry.sha256, entry.bytes):
        return f"shard {entry.name}: its bytes changed since the task wrote it (sha256 or size differ)"
    if [meta.get("key") for meta in scan.metadata] != entry.keys:
        return f"shard {entry.name}: holds other samples than its manifest lists"
    totals[entry.name] = (sum(m["num_frames"] for m in scan.metadata), sum(m["duration_s"] for m in scan.metadata))
    return None
