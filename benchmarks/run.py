"""`make bench`: every CPU benchmark in one run, each into its section of benchmarks/RESULTS.md, and a summary.

1. shard building against the strongest builders a user would write, and against the floor of the work (decoding
alone; decoding and encoding the kept frames), with its memory on long clips; 2. the loader against webdataset's
own pipeline (with emi's decode, the same tensors, and with PIL), and against JPEG decode + resize alone; 3. the
trainer's step against a plain loop doing the same per step, and against forward + backward + optimizer alone;
4. Stage II from cached features against features on the fly; 5. the loader reading from a local S3 server
against local disk. Every comparison uses benchmarks/harness.py: interleaved rounds, medians and ranges. Sections
other benchmarks wrote (the GPU runs, the learning and ablation numbers) are kept.

    python -m benchmarks.run [--only shards loader trainer stage2 storage] [--quick] [--out benchmarks/RESULTS.md]

--quick runs every benchmark on small inputs in few rounds (the numbers mean little) and writes only where --out
says.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from benchmarks import bench_loader, bench_shards, bench_stage2, bench_storage, bench_trainer
from benchmarks.harness import cpu_model, render, table
from benchmarks.results import RESULTS, write_section

BENCHMARKS: dict[str, tuple[str, ModuleType]] = {
    "shards": ("1. Shard building", bench_shards),
    "loader": ("2. Loader", bench_loader),
    "trainer": ("3. Trainer overhead", bench_trainer),
    "stage2": ("4. Stage II: cached features against features on the fly", bench_stage2),
    "storage": ("5. Object storage", bench_storage),
}
SUMMARY = "Summary of make bench"


def measure(names: list[str], quick: bool, out: Path | None) -> list[list[str]]:
    """Run the named benchmarks in order, each section written to `out` (where given) as soon as it is measured;
    their summary rows."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="emi-bench-") as tmp:
        for name in names:
            heading, module = BENCHMARKS[name]
            print(f"benchmark {name} ...", file=sys.stderr, flush=True)
            begin = time.perf_counter()
            result = module.run(Path(tmp) / name, quick=quick)
            minutes = f"{(time.perf_counter() - begin) / 60:.1f}"
            body = render("bench_section", body=module.section(result), minutes=minutes)
            print(f"## {heading}\n\n{body}\n", flush=True)
            if out is not None:
                write_section(heading, body, out)
            rows += module.summary(result)
    return rows


def summary(rows: list[list[str]], started: datetime.datetime, seconds: float) -> str:
    return render(
        "bench_summary",
        date=f"{started:%Y-%m-%d %H:%M}",
        minutes=f"{seconds / 60:.0f}",
        cores=os.cpu_count(),
        cpu=cpu_model(),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        table=table(["benchmark", "measured: median (range)", "target", "met"], rows),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="small inputs, few rounds: a check of the plumbing")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"the results file (default: {RESULTS}; none with --quick)"
    )
    args = parser.parse_args(argv)
    out = args.out if args.out is not None or args.quick else RESULTS
    started, start = datetime.datetime.now(datetime.UTC), time.perf_counter()
    rows = measure(args.only, args.quick, out)
    text = summary(rows, started, time.perf_counter() - start)
    print(f"## {SUMMARY}\n\n{text}")
    if out is not None and args.only == list(BENCHMARKS):  # a partial run leaves the last full summary alone
        write_section(SUMMARY, text, out, first=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
