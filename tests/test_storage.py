"""Object storage in and out, against a real S3 server (SeaweedFS on loopback, one per module): shards built into a
bucket equal a local build, stream back through the loader's reader, survive transient errors and a server restart
mid-epoch without losing or repeating a sample, leave no partial object when the build is killed, and permanent
errors name the URL. Credentials come from the environment only and appear in no manifest, log or message."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.s3server import SECRET_KEY
from emi import storage
from emi.cli import main
from emi.data.plan import Segment
from emi.data.reader import read_segments
from emi.data.urls import resolve_shards

from helpers import EMI, GRID, KEYS, REPO, cpu_env, exported, grid_labels, launch_command, wait_until, write_labels

EVERYTHING = re.compile(r".*")


@pytest.fixture(scope="module")
def grid(server, tmp_path_factory) -> dict:
    """The GRID clips built in shards of 3 into s3://emi/grid/train and into a local folder, with the same args."""
    root = tmp_path_factory.mktemp("grid")
    labels = write_labels(root / "labels.csv", grid_labels(KEYS), with_extension=True)
    common = ["shards", "build", "--videos", str(GRID), "--labels", str(labels), "--shard-size", "3"]
    codes = (main([*common, "--out", "s3://emi/grid/train"]), main([*common, "--out", str(root / "local")]))
    return {"root": root, "labels": labels, "local": root / "local", "url": "s3://emi/grid/train", "codes": codes}


def objects(url: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(f"{url}/{name}") for name in storage.list_names(url)}


def raw_samples(spec: str) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a shard spec, in order, as (key, {extension: bytes}), through the loader's reader."""
    shards = resolve_shards(spec).shards
    segments = [Segment(i, 0, shard.num_samples) for i, shard in enumerate(shards)]
    read = read_segments([shard.url for shard in shards], segments, (), EVERYTHING)
    return [(raw.key, raw.entries) for _, raw in read]


def test_shards_built_into_a_bucket_are_the_local_build(grid):
    assert grid["codes"] == (0, 0)
    local = {path.name: path.read_bytes() for path in grid["local"].iterdir() if not path.name.startswith(".")}
    remote = objects(grid["url"])
    assert sorted(remote) == [
        "failures.jsonl",
        "manifest.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert remote == local  # byte for byte, the manifest included
    assert SECRET_KEY not in remote["manifest.json"].decode()


def test_stats_of_the_bucket_are_those_of_the_local_folder(grid):
    from emi.shards.stats import shard_stats

    assert shard_stats(grid["url"]) == shard_stats(grid["local"])


def test_the_reader_streams_shards_from_the_bucket(grid):
    from_bucket = raw_samples(grid["url"])
    assert [key for key, _ in from_bucket] == KEYS
    assert from_bucket == raw_samples(str(grid["local"]))


def test_a_stream_reads_in_requests_of_read_block_bytes(grid, monkeypatch):
    """Each ranged request is READ_BLOCK bytes (the last one the rest), however little the reader asks for at a time:
    the stream's buffer must not cap the requests below it."""
    block = 2 << 20
    payload = random.Random(0).randbytes(3 * block + 12345)
    storage.write_bytes("s3://emi/blocks/object.bin", payload)
    monkeypatch.setattr(storage, "READ_BLOCK", block)
    sizes = []
    real_read = storage.ResumableReader._read

    def counted_read(self, size):
        data = real_read(self, size)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(storage.ResumableReader, "_read", counted_read)
    with storage.open_stream("s3://emi/blocks/object.bin") as stream:
        read = b"".join(iter(lambda: stream.read(10_000), b""))  # small reads, as tarfile's
    assert read == payload
    assert sizes == [block, block, block, 12345]


def test_a_stream_resumes_at_the_byte_it_reached_after_transient_errors(grid, monkeypatch, caplog):
    """Connection resets and a read that ends early, on a shard stream: each sample comes once, intact."""
    real_read = storage.ResumableReader._read
    calls = {"count": 0}

    def flaky_read(self, size):
        calls["count"] += 1
        if calls["count"] in (3, 9):
            raise ConnectionResetError(104, "Connection reset by peer")
        if calls["count"] == 6:  # the object seems to end here: a truncated response
            return b""
        return real_read(self, min(size, 64 << 10))  # small reads, so the faults land inside samples

    monkeypatch.setattr(storage.ResumableReader, "_read", flaky_read)
    monkeypatch.setattr(storage, "BACKOFF_S", (0.01, 0.05))
    with caplog.at_level(logging.WARNING, logger="emi.storage"):
        from_bucket = raw_samples(grid["url"])
    assert from_bucket == raw_samples(str(grid["local"]))
    retries = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
    assert len(retries) == 3, retries
    assert "s3://emi/grid/train/train-000000.tar: cannot read it at byte " in retries[0]
    assert "ConnectionResetError" in retries[0] and "ended at byte" in retries[1]


def test_permanent_errors_name_the_url(grid, monkeypatch, capsys, tmp_path):
    assert (
        main(
            [
                "features",
                "extract",
                "--encoders",
                str(tmp_path),
                "--shards",
                "s3://no-such-bucket/train",
                "--out",
                str(tmp_path / "features"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "s3://no-such-bucket/train" in error and "no such bucket or object" in error, error

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.forget_filesystems()  # the next call signs with the wrong secret
    try:
        assert main(["shards", "merge", grid["url"]]) == 2
        error = capsys.readouterr().err
    finally:
        monkeypatch.undo()
        storage.forget_filesystems()
    assert "s3://emi/grid/train/.emi-tasks: cannot list it: access denied" in error, error
    assert "not-the-secret" not in error


def test_a_killed_build_leaves_no_partial_object_and_the_rerun_completes(grid, server):
    url = "s3://emi/killed/train"
    command = [
        *EMI,
        "shards",
        "build",
        "--videos",
        str(GRID),
        "--labels",
        str(grid["labels"]),
        "--out",
        url,
        "--shard-size",
        "1",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=cpu_env(**server.env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:  # killed once the first shard is up, while the next ones are built and uploaded
        wait_until(
            lambda: [n for n in storage.list_names(url) if n.endswith(".tar")],
            300,
            "a first shard uploaded",
            alive=process,
        )
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
    assert SECRET_KEY not in stderr.decode()
    assert (
        main(
            [
                "shards",
                "build",
                "--videos",
                str(GRID),
                "--labels",
                str(grid["labels"]),
                "--out",
                str(grid["root"] / "clean"),
                "--shard-size",
                "1",
            ]
        )
        == 0
    )
    clean = {path.name: path.read_bytes() for path in (grid["root"] / "clean").glob("train-*.tar")}
    uploaded = {name: data for name, data in objects(url).items() if name.endswith(".tar")}
    assert 1 <= len(uploaded) < len(clean)
    assert all(clean[name] == data for name, data in uploaded.items())  # every object there is whole
    assert main(command[3:]) == 0
    assert {name: data for name, data in objects(url).items() if name.endswith(".tar")} == clean


def stage1_overrides(train: str, out: Path, name: str) -> list[str]:
    return [
        "-m",
        "emi.stages.stage1",
        "--config",
        "configs/stage1/tiny.yaml",
        f"data.train={train}",
        "data.val=null",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"run.publish_to=s3://emi/runs/{name}",
        "data.batch_size=2",
        "data.shuffle_buffer=4",
        "data.num_workers=0",
        "train.epochs=1",
        "train.strategy=ddp",
        "train.log_every=1",
        "train.checkpoint_every=1000",
    ]


def test_stage1_trains_from_the_bucket_through_a_server_restart_mid_epoch(server, tmp_path):
    """Two ranks read their epoch from the bucket (in step with training: no loader workers reading ahead); the
    server goes down and comes back while they are mid-epoch.
    The epoch completes with no sample skipped and ends with the weights of the same run from local disk, so every
    sample was read exactly once."""
    from emi.synth import synthesize

    synthesize(out=tmp_path / "synth", clips=16, seed=3, workers=2)
    url = "s3://emi/restart/train"
    assert (
        main(
            [
                "shards",
                "build",
                "--videos",
                str(tmp_path / "synth" / "videos"),
                "--labels",
                str(tmp_path / "synth" / "labels.csv"),
                "--transcripts",
                str(tmp_path / "synth" / "transcripts.csv"),
                "--out",
                url,
                "--shard-size",
                "2",
                "--frame-size",
                "64",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    local = tmp_path / "local"
    local.mkdir()
    for name, data in objects(url).items():
        (local / name).write_bytes(data)

    runs = tmp_path / "runs"
    reference = subprocess.run(
        launch_command(
            *stage1_overrides(str(local), runs, "local")[:1], stage1_overrides(str(local), runs, "local")[1:]
        ),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-6000:]

    log = runs / "bucket" / "log.txt"
    with open(tmp_path / "bucket.err", "w") as stderr:
        process = subprocess.Popen(
            launch_command(*stage1_overrides(url, runs, "bucket")[:1], stage1_overrides(url, runs, "bucket")[1:]),
            cwd=REPO,
            env=cpu_env(**server.env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            wait_until(lambda: log.exists() and "step 1/" in log.read_text(), 300, "step 1", alive=process)
            os.killpg(process.pid, signal.SIGSTOP)  # hold the ranks mid-epoch while the server goes down
            server.stop()
            os.killpg(process.pid, signal.SIGCONT)
            wait_until(
                lambda: "; retrying in" in (tmp_path / "bucket.err").read_text(),
                300,
                "the ranks finding no server and retrying",
                alive=process,
            )
            server.start()
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            if server.process is None:
                server.start()
    errors = (tmp_path / "bucket.err").read_text()
    text = log.read_text()
    assert process.returncode == 0, errors[-6000:]
    assert re.search(r"s3://emi/restart/train/train-\d{6}\.tar: cannot .*; retrying in", errors), errors[-6000:]
    assert "done: 4 steps" in text, text  # 16 clips / (2 per batch x 2 ranks)
    assert re.findall(r"skipped_samples (\S+)", text) == ["0"] * 4 and "corrupt or unreadable" not in text, text
    assert SECRET_KEY not in errors + text
    reference_weights, bucket_weights = exported(runs / "local"), exported(runs / "bucket")
    assert all(torch.equal(reference_weights[key], bucket_weights[key]) for key in reference_weights)
    published = {
        path.relative_to(runs / "bucket" / "export").as_posix(): path.read_bytes()
        for path in (runs / "bucket" / "export").rglob("*")
        if path.is_file()
    }
    assert {name: storage.read_bytes(f"s3://emi/runs/bucket/export/{name}") for name in published} == published


def test_features_reports_and_predictions_go_to_the_bucket(
    server, encoders, clip_shards, feature_shards, checkpoint, tmp_path
):
    """`emi features extract --out s3://...` writes the local extraction's bytes; evaluate and predict read those
    features from the bucket and write their report, figure and CSV there, with the local runs' numbers."""
    from emi.serve.evaluate import evaluate
    from emi.serve.predict import predict_to_csv

    url = "s3://emi/features/test"
    assert (
        main(
            [
                "features",
                "extract",
                "--encoders",
                str(encoders),
                "--shards",
                str(clip_shards),
                "--out",
                url,
                "--batch-size",
                "4",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert objects(url) == {path.name: path.read_bytes() for path in feature_shards.iterdir()}

    report = evaluate(checkpoint, url, out="s3://emi/reports/test.json", batch_size=3, tb=tmp_path / "tb", workers=0)
    local = evaluate(
        checkpoint, str(feature_shards), out=tmp_path / "test.json", batch_size=3, tb=tmp_path / "tb", workers=0
    )
    assert json.loads(storage.read_bytes("s3://emi/reports/test.json")) == report == {**local, "shards": url}
    assert storage.read_bytes("s3://emi/reports/test.png").startswith(b"\x89PNG\r\n\x1a\n")

    predict_to_csv(checkpoint, "s3://emi/predictions/test.csv", shards=url, batch_size=1, workers=0)
    predict_to_csv(checkpoint, tmp_path / "test.csv", shards=str(feature_shards), batch_size=1, workers=0)
    assert storage.read_bytes("s3://emi/predictions/test.csv") == (tmp_path / "test.csv").read_bytes()
    assert json.loads(storage.read_bytes("s3://emi/predictions/test.failures.json"))["num_predicted"] == len(KEYS)


def test_clips_come_from_a_bucket(grid, tmp_path):
    """--videos s3://...: the objects are listed, each clip fetched by its worker and decoded: the shards of the
    local build, and an object no CSV row names is reported as locally."""
    for clip in GRID.glob("*.mpg"):
        storage.write_bytes(f"s3://emi/videos/{clip.name}", clip.read_bytes())
    storage.write_bytes("s3://emi/videos/notes.mp4", b"not a video\n")
    out = tmp_path / "from-bucket"
    assert (
        main(
            [
                "shards",
                "build",
                "--videos",
                "s3://emi/videos",
                "--labels",
                str(grid["labels"]),
                "--out",
                str(out),
                "--shard-size",
                "3",
                "--workers",
                "2",
            ]
        )
        == 3
    )
    for shard in grid["local"].glob("train-*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()] == [
        {"path": "notes.mp4", "reason": "no row in labels.csv: clip has no labels"}
    ]
    assert json.loads((out / "manifest.json").read_text())["args"]["videos"] == "s3://emi/videos"
    assert (
        main(
            [
                "shards",
                "build",
                "--videos",
                "s3://emi/nothing-here",
                "--labels",
                str(grid["labels"]),
                "--out",
                str(tmp_path / "none"),
            ]
        )
        == 2
    )


def emi_command(server, *args: str) -> subprocess.CompletedProcess:
    """`python -m emi.cli ARGS` as a user runs it (default --workers), against the test server."""
    return subprocess.run(
        [sys.executable, "-m", "emi.cli", *args],
        cwd=REPO,
        env=cpu_env(**server.env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_commands_with_s3_in_and_s3_out_end_with_the_local_results(
    server, encoders, clip_shards, feature_shards, checkpoint, tmp_path
):
    """Features, evaluation, batch prediction and Stage II training read from the bucket and write to it (training
    publishes its exports there), each in a subprocess with the default loader worker (a forked DataLoader worker
    reads the shards): each ends, with the local run's results. The first three hung for ever in their last write
    before."""
    clips, features = "s3://emi/cli/clips", "s3://emi/cli/features"
    for path in clip_shards.iterdir():
        storage.write_bytes(f"{clips}/{path.name}", path.read_bytes())
    extracted = emi_command(
        server,
        "features",
        "extract",
        "--encoders",
        str(encoders),
        "--shards",
        clips,
        "--out",
        features,
        "--batch-size",
        "4",
    )
    assert extracted.returncode == 0, extracted.stderr[-3000:]
    written = objects(features)
    local = {path.name: path.read_bytes() for path in feature_shards.iterdir()}
    assert {name: data for name, data in written.items() if name != "manifest.json"} == {
        name: data for name, data in local.items() if name != "manifest.json"
    }
    assert {**json.loads(written["manifest.json"]), "source": None} == {
        **json.loads(local["manifest.json"]),
        "source": None,
    }

    evaluated = emi_command(
        server,
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--shards",
        features,
        "--out",
        "s3://emi/cli/eval/test.json",
        "--tb",
        str(tmp_path / "tb"),
        "--batch-size",
        "3",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(storage.read_bytes("s3://emi/cli/eval/test.json")) == json.loads(evaluated.stdout)
    assert storage.read_bytes("s3://emi/cli/eval/test.png").startswith(b"\x89PNG\r\n\x1a\n")

    predicted = emi_command(
        server,
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--shards",
        features,
        "--out",
        "s3://emi/cli/test.csv",
        "--batch-size",
        "1",
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--shards",
                str(feature_shards),
                "--out",
                str(tmp_path / "test.csv"),
                "--batch-size",
                "1",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert storage.read_bytes("s3://emi/cli/test.csv") == (tmp_path / "test.csv").read_bytes()

    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "emi.stages.stage2",
            "--config",
            "stage2/tiny.yaml",
            f"data.train={features}",
            f"data.val={features}",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=s3",
            "data.batch_size=4",
            "train.epochs=2",
            "run.publish_to=s3://emi/cli/runs/s3",
        ],
        cwd=REPO,
        env=cpu_env(**server.env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    for export in ("best", "export"):
        local = tmp_path / "runs" / "s3" / export
        files = [path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()]
        assert files and all(
            storage.read_bytes(f"s3://emi/cli/runs/s3/{export}/{name}") == (local / name).read_bytes() for name in files
        )
    errors = extracted.stderr + evaluated.stderr + predicted.stderr + trained.stderr
    assert "attached to a different loop" not in errors and "could not publish" not in errors


def test_a_store_that_stops_answering_ends_in_a_clear_error_not_a_hang(grid, server, monkeypatch):
    """The server is frozen (SIGSTOP: connections open, no answer): every call gives up after its time limit and is
    retried; after the retry deadline the command stops with one line naming the URL and exit code 3."""
    monkeypatch.setattr(storage, "CALL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "RETRY_DEADLINE_S", 4.0)
    monkeypatch.setattr(storage, "BACKOFF_S", (0.2, 1.0))
    storage.forget_filesystems()  # no connection of an earlier test to reuse
    server.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(storage.StorageUnavailable) as err:
            storage.read_bytes(f"{grid['url']}/manifest.json")
        assert main(["shards", "stats", grid["url"]]) == 3
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert str(err.value).startswith(f"{grid['url']}/manifest.json: cannot read it, still failing after retrying 4 s")
    assert "no answer within the call's time limit" in str(err.value)
    assert json.loads(storage.read_bytes(f"{grid['url']}/manifest.json"))["num_samples"] == len(KEYS)
