"""`make bench`: every CPU benchmark in one run, written to benchmarks/RESULTS.md.

1. shard building (emi shards build --workers 2 against the faster of two user baselines with 2 workers, on short
and long clips, and its peak memory on a 10-second and a 10-minute 720p clip), 2. loader (against a minimal
reader and webdataset's own pipeline), 3. trainer overhead (fit with DeepSpeed against a plain loop), 4. Stage II
from cached features against features on the fly, 5. the loader reading from a local S3 server against local disk.
Each section says what was measured, how, the numbers, the ratio, the target and whether it
was met, with the load average before it. Every other section of an earlier RESULTS.md (the "## GPU: ..." runs of
benchmarks/gpu_stage1.py, benchmarks/ablation.py's "## Learning and ablation") is kept. About 7 minutes on 2 cores.

    python -m benchmarks.run [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import bench_loader, bench_shards, bench_stage2, bench_storage, bench_trainer
from benchmarks.timing import cpu_model, load_average, table

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = re.compile(r"^## .*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
OWN_SECTION = re.compile(r"## [1-5]\. ")  # the headings of the sections this run writes


def kept_sections(text: str) -> list[str]:
    """The sections ('## ' heading up to the next one) of an earlier RESULTS.md that this run does not write."""
    return [match.group(0).rstrip() + "\n" for match in SECTION.finditer(text) if not OWN_SECTION.match(match.group(0))]


def summary(results: dict[str, dict]) -> str:
    shards, loader = results["shards"], results["loader"]
    trainer, stage2 = results["trainer"], results["stage2"]
    met = {True: "yes", False: "**no**"}
    return table(
        ["benchmark", "measured", "target", "met"],
        [
            [
                "1. shard building, clips/s: emi (2 workers) / the faster user baseline (2 at a time), short; long "
                "clips",
                f"{shards['short']['ratio']}; {shards['long']['ratio']}",
                ">= 1.0",
                met[shards["short"]["met"] and shards["long"]["met"]],
            ],
            [
                "1. shard building, peak RSS: 10-min / 10-s 720p clip, no crop; face crop",
                "; ".join(
                    str(shards["memory"][crop]["ratio"]) for crop in ("none", "opencv") if crop in shards["memory"]
                ),
                "<= 1.5",
                met[shards["memory"]["met"]],
            ],
            [
                "2. loader, samples/s: 1 worker / ceiling; 2 workers / 1 worker; 2 workers / webdataset (clip; frame)",
                f"{loader['ratio_1_worker_to_ceiling']}; {loader['speedup_2_workers_over_1']}; "
                f"{loader['clip_over_webdataset']}; {loader['frame_over_webdataset']}",
                ">= 0.8; > 1; >= 1.0; >= 1.0",
                met[loader["met"]],
            ],
            [
                "3. trainer step time: fit ZeRO-2 / plain loop (1 process, median block)",
                trainer["overhead_zero2"],
                "<= 1.3",
                met[trainer["met"]],
            ],
            [
                "4. Stage II epoch time: on the fly / cached features",
                f"{stage2['speedup']}x",
                "cached much faster",
                met[stage2["speedup"] > 1.0],
            ],
            [
                "5. loader samples/s: shards on a local S3 server / on local disk",
                results["storage"].get("ratio_s3_to_local", "skipped"),
                ">= 0.8",
                met[results["storage"]["met"]],
            ],
        ],
    )


def document(
    results: dict[str, dict], sections: list[str], kept: list[str], started: datetime.datetime, seconds: float
) -> str:
    header = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m benchmarks.run`) on {started:%Y-%m-%d %H:%M} UTC in {seconds:.0f} s. "
        f"Machine: {os.cpu_count()} CPU cores ({cpu_model()}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}. The machine is shared: each section gives the 1-minute load average "
        "before it, and every speed goal is a ratio against a baseline measured in the same run on the same inputs.",
        "",
        summary(results),
        "",
    ]
    return "\n".join(header + [section + "\n" for section in sections] + kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started, start = datetime.datetime.now(datetime.UTC), time.perf_counter()
    kept = kept_sections(args.out.read_text()) if args.out.is_file() else []
    with tempfile.TemporaryDirectory(prefix="emi-bench-") as tmp:
        work = Path(tmp)
        videos, labels = bench_shards.prepare_clips(work / "clips")
        benchmarks: dict[str, tuple[Callable[[], dict], Callable[[dict], str]]] = {
            "shards": (lambda: bench_shards.run(videos, labels, work / "shards"), bench_shards.section),
            "loader": (
                lambda: bench_loader.run(bench_loader.write_synthetic_shards(work / "loader")),
                bench_loader.section,
            ),
            "trainer": (lambda: bench_trainer.run(work / "trainer"), bench_trainer.section),
            # the clip shards the shard benchmark built (48 clips at 256 px)
            "stage2": (lambda: bench_stage2.run(work / "shards" / "emi", work / "stage2"), bench_stage2.section),
            "storage": (lambda: bench_storage.run(work / "loader", work / "s3"), bench_storage.section),
        }
        results, sections = {}, []
        for name, (measure, section) in benchmarks.items():
            load, begin = load_average(), time.perf_counter()
            print(f"benchmark {name} (load average {load}) ...", file=sys.stderr, flush=True)
            results[name] = measure()
            sections.append(
                f"{section(results[name])}\n\nLoad average (1 min) before: {load}; "
                f"took {time.perf_counter() - begin:.0f} s."
            )
    args.out.write_text(document(results, sections, kept, started, time.perf_counter() - start))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
