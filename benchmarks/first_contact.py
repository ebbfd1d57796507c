"""What a newcomer meets: `make demo` and `make test` on fresh clones, one after the other, with busy processes
beside them, several rounds in a row; into the section "First contact: make demo and make test" of RESULTS.md.

Each round clones the checkout's HEAD into a new folder (nothing carried over: its own .venv, data and runs), starts
`--busy` processes that spin on the CPU for the whole round, then runs `make demo` and `make test` there, timing each
(set-up included: the first command creates the venv) and keeping its exit code and the load average it ran at.

    python -m benchmarks.first_contact [--rounds 3] [--busy 2] [--idle-test]

`--idle-test` adds one `make test` on a fresh clone with nothing beside it. Hours on 2 cores: run it when the
machine is otherwise free, beside nothing but the busy processes it starts itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.harness import table
from benchmarks.results import write_section

REPO = Path(__file__).resolve().parents[1]
HEADING = "First contact: make demo and make test"


@contextmanager
def busy_processes(count: int):
    """`count` processes that keep a core busy each until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def make(target: str, clone: Path, log: Path) -> dict:
    """`make TARGET` in the clone: exit code, minutes, and the 1-minute load average sampled every 30 s."""
    samples, begin = [], time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(["make", target], cwd=clone, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            samples.append(os.getloadavg()[0])
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
    return {
        "target": target,
        "code": process.returncode,
        "minutes": (time.monotonic() - begin) / 60,
        "load": sum(samples) / len(samples) if samples else os.getloadavg()[0],
        "log": log,
    }


def fresh_clone(root: Path, name: str, commit: str) -> Path:
    clone = root / name
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    return clone


def run_rounds(rounds: int, busy: int, idle_test: bool, root: Path) -> tuple[list[dict], str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()  # every round on this commit, whatever lands meanwhile
    runs = []
    for number in range(1, rounds + 1):
        clone = fresh_clone(root, f"round-{number}", commit)
        with busy_processes(busy):
            for target in ("demo", "test"):
                result = make(target, clone, root / f"round-{number}-{target}.log")
                runs.append({"round": number, "beside": f"{busy} busy", **result})
                print(
                    f"round {number}: make {target}: exit {result['code']} in {result['minutes']:.1f} min at "
                    f"load {result['load']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    if idle_test:
        result = make("test", fresh_clone(root, "idle", commit), root / "idle-test.log")
        runs.append({"round": "idle", "beside": "nothing", **result})
    return runs, commit


def section(runs: list[dict], commit: str, busy: int) -> str:
    rows = [
        [
            run["round"],
            f"make {run['target']}",
            run["beside"],
            f"{run['load']:.1f}",
            f"{run['minutes']:.1f}",
            run["code"],
        ]
        for run in runs
    ]
    passed = sum(run["code"] == 0 for run in runs)
    return "\n".join(
        [
            f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d} on commit {commit} by "
            "`python -m benchmarks.first_contact` on this 2-core machine: each round clones the commit afresh and runs "
            f"`make demo` then `make test` there with {busy} processes spinning on the CPU beside them; minutes "
            "include "
            "`make setup` (the first command of a round creates the venv and builds DeepSpeed's CPU op). Load: the "
            "1-minute load average, sampled every 30 s while the command ran.",
            "",
            table(["round", "command", "beside it", "load", "minutes", "exit code"], rows),
            "",
            f"{passed} of {len(runs)} commands passed.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="processes spinning on the CPU beside the commands")
    parser.add_argument("--idle-test", action="store_true", help="also one make test with nothing beside it")
    parser.add_argument("--keep", type=Path, default=None, help="clone into this folder and keep it (logs too)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emi-first-contact-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        runs, commit = run_rounds(args.rounds, args.busy, args.idle_test, root)
    write_section(HEADING, section(runs, commit, args.busy))
    print(f"wrote the section {HEADING!r} of benchmarks/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
