"""Feature extraction on two ranks and Stage II training on the shared loop, with tiny encoders on synthetic shards."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emi.cli import main
from emi.data.folds import fold_of
from emi.serve.features import clip_features, clip_loader, load_frozen_encoders
from emi.serve.predict import predict

from helpers import EMI, REPO, cpu_env, launch, launch_holding_back, scalars


@pytest.fixture(scope="module")
def features(encoders, synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    for split in ("train", "val"):
        launch(
            "-m",
            [
                "emi.cli",
                "features",
                "extract",
                "--encoders",
                str(encoders),
                "--shards",
                str(synthetic_shards[split]),
                "--out",
                str(out / split),
                "--batch-size",
                "4",
            ],
        )
    return out


def feature_sample(shard, key):
    """The entries of one sample of a feature shard, by extension."""
    with tarfile.open(shard) as tar:
        return {
            member.name.split(".", 1)[1]: tar.extractfile(member).read()
            for member in tar
            if member.name.split(".", 1)[0] == key
        }


def test_two_ranks_extract_every_clip_once_with_the_shapes_of_the_clip(features, synthetic_shards, encoders):
    manifest = json.loads((features / "train" / "manifest.json").read_text())
    source = json.loads((synthetic_shards["train"] / "manifest.json").read_text())
    assert manifest["format"] == "emi-features/1" and manifest["num_samples"] == 48
    assert [s["name"] for s in manifest["shards"]] == [s["name"] for s in source["shards"]]
    assert [s["keys"] for s in manifest["shards"]] == [s["keys"] for s in source["shards"]]
    assert manifest["dims"] == {"vision": 64, "audio": 64, "text": 64}
    assert manifest["preprocessing"]["frame_size"] == 64 and manifest["preprocessing"]["fps"] == 5.0

    # One clip, recomputed here in one process, equals what the two-rank extraction stored (float16).
    frozen = load_frozen_encoders(encoders)
    first = source["shards"][0]
    data = clip_loader(str(synthetic_shards["train"] / first["name"]), frozen, list(source["labels"]), 4, 0)
    data.set_epoch(0)
    clip = clip_features(frozen, next(iter(data.dataloader)), fps=5.0)[0]
    stored = feature_sample(features / "train" / first["name"], clip["key"])
    meta = json.loads(stored["json"])
    assert meta["num_frames"] == clip["num_frames"] and meta["has_audio"] is True
    for name in ("vision", "audio", "text"):
        array = np.load(io.BytesIO(stored[f"{name}.npy"]), allow_pickle=False)
        assert array.dtype == np.float16 and array.shape == clip[name].shape
        np.testing.assert_allclose(array.astype(np.float32), clip[name], rtol=2e-3, atol=2e-3)


def test_extraction_resumes_and_redoes_only_a_damaged_shard(features, synthetic_shards, encoders):
    out = features / "train"
    shards = sorted(out.glob("train-*.tar"))
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in shards}
    shards[1].write_bytes(shards[1].read_bytes()[:1000])  # a truncated shard: its sidecar sha no longer matches
    result = launch(
        "-m",
        [
            "emi.cli",
            "features",
            "extract",
            "--encoders",
            str(encoders),
            "--shards",
            str(synthetic_shards["train"]),
            "--out",
            str(out),
            "--batch-size",
            "4",
        ],
        num_processes=1,
    )
    assert '"extracted_here": 1' in result.stdout
    for path in shards:
        mtime, data = before[path.name]
        assert path.read_bytes() == data  # byte-identical, the redone one included
        assert (path.stat().st_mtime_ns == mtime) == (path != shards[1])


def test_a_held_back_rank_is_waited_for_and_a_half_done_output_is_completed(encoders, synthetic_shards, tmp_path):
    """Rank 1 is stopped as it starts writing its shard, until rank 0 has extracted its share and waits for it: the
    run succeeds and the manifest lists every shard. Then rank 1's shard is deleted and the extraction run again
    with rank 1 held back the same way: rank 0 has nothing to do and waits at once; the shard comes back byte for
    byte."""
    out = tmp_path / "features"
    args = [
        "emi.cli",
        "features",
        "extract",
        "--encoders",
        str(encoders),
        "--shards",
        str(synthetic_shards["train"]),
        "--out",
        str(out),
        "--batch-size",
        "4",
    ]
    names = [entry["name"] for entry in json.loads((synthetic_shards["train"] / "manifest.json").read_text())["shards"]]
    assert len(names) == 3
    held = names[1]  # each of the two ranks takes every other shard: rank 1 this one
    writing = out / f".{held}.tmp"  # where rank 1 writes it until it is complete

    def rank_1_is_not_done() -> None:
        assert writing.exists() and not (out / held).exists()

    first = launch_holding_back(
        args,
        1,
        writing.exists,
        "rank 0: extracted 2 shard(s); waiting for the other ranks",
        tmp_path / "first.log",
        before_release=rank_1_is_not_done,
    )
    assert first.returncode == 0, first.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["name"] for entry in manifest["shards"]] == names and manifest["num_samples"] == 48

    extracted = (out / held).read_bytes()
    (out / held).unlink()
    again = launch_holding_back(
        args,
        1,
        writing.exists,
        "rank 0: extracted 0 shard(s); waiting for the other ranks",
        tmp_path / "again.log",
        before_release=rank_1_is_not_done,
    )
    assert again.returncode == 0, again.output
    assert (out / held).read_bytes() == extracted
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_extraction_needs_a_manifest_to_know_how_the_clips_were_prepared(
    features, synthetic_shards, encoders, tmp_path, capsys
):
    """`pipe:` URLs have no manifest beside them: refused with the reason, unless one is given, which then gives
    the same features as the shard folder did."""
    name = sorted(path.name for path in synthetic_shards["train"].glob("train-*.tar"))[0]
    url = f"pipe:cat {synthetic_shards['train'] / name}"
    common = ["features", "extract", "--encoders", str(encoders), "--shards", url, "--batch-size", "4"]
    assert main([*common, "--out", str(tmp_path / "refused")]) == 2
    assert f"no manifest.json lists shard {url}" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    manifest = synthetic_shards["train"] / "manifest.json"
    assert main([*common, "--out", str(tmp_path / "piped"), "--manifest", str(manifest)]) == 0
    assert (tmp_path / "piped" / name).read_bytes() == (features / "train" / name).read_bytes()
    written = json.loads((tmp_path / "piped" / "manifest.json").read_text())
    assert written["preprocessing"]["frame_size"] == 64 and "Joy" in written["labels"]


@pytest.fixture(scope="module")
def stage2_runs(features, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")

    def run(name, *extra):
        launch(
            "train/stage2.py",
            [
                "--config",
                "configs/stage2/tiny.yaml",
                f"data.train={features / 'train'}",
                f"data.val={features / 'val'}",
                f"run.output_dir={out}",
                f"run.name={name}",
                "data.batch_size=4",
                "train.epochs=4",
                "train.log_every=1",
                "train.checkpoint_every=2",
                *extra,
            ],
        )

    run("full")
    # stops mid-epoch (6 steps per epoch), then resumes; logging every 20 steps, more than the first part runs
    run("cut", "train.max_steps=9", "train.log_every=20")
    run("cut", "--resume", "latest", "train.log_every=20")
    return out


def test_stage2_trains_evaluates_each_clip_once_and_exports_the_best(stage2_runs):
    run_dir = stage2_runs / "full"
    assert "MULTI_CPU world=2" in (run_dir / "log.txt").read_text()
    assert [v for _, v in scalars(run_dir, "val/num_samples")] == [16.0] * 4
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert len(losses) == 24 and all(np.isfinite(losses))
    for tag in (
        "val/mean_pearson",
        "val/mse",
        "val/pearson/Joy",
        "val/mean_pearson_without_vision",
        "val/mean_pearson_without_audio",
        "val/mean_pearson_without_text",
    ):
        assert len(scalars(run_dir, tag)) == 4, tag
    best = json.loads((run_dir / "best" / "trainer.json").read_text())
    assert best["mean_pearson"] == pytest.approx(max(v for _, v in scalars(run_dir, "val/mean_pearson")), rel=1e-6)
    config = json.loads((run_dir / "best" / "config.json").read_text())
    assert config["format"] == "emi-fusion/3" and config["labels"][-1] == "Joy"
    assert config["model"]["vision_dim"] == 64 and config["preprocessing"]["frame_size"] == 64


def test_the_first_and_last_steps_are_logged_and_lines_count_epochs_alike(stage2_runs):
    """log_every=20 in runs of 9 and then 24 steps: the first step and each part's last are logged anyway, so a
    short run still has a curve; step, val and resume lines number the epochs from 1 alike."""
    cut = stage2_runs / "cut"
    assert [step for step, _ in scalars(cut, "train/loss")] == [1, 9, 20, 24]
    log = (cut / "log.txt").read_text()
    assert "epoch 1/4 step 1/9 loss" in log and "epoch 1/4 val: " in log and "epoch 4/4 step 24/24 " in log
    assert re.search(r"resumed from .*step-00000009: epoch 2 step 9 \(batch 3 of the epoch\)", log), log
    assert "epoch 2/4 step 9/9 " in log and "epoch 2/4 val" not in log.split("resumed from")[0]


def test_stage2_resume_mid_epoch_ends_with_the_uninterrupted_ema_weights(stage2_runs):
    full, cut = stage2_runs / "full", stage2_runs / "cut"
    assert "resumed from" in (cut / "log.txt").read_text()
    for folder in ("export", "best"):
        a, b = load_file(str(full / folder / "model.safetensors")), load_file(str(cut / folder / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_best_predicts_the_same_when_copied_away_from_the_deleted_run_and_encoders(
    features, encoders, synthetic_shards, tmp_path
):
    """best/ carries the encoders the features came from: copied to a fresh folder after the run and the Stage I
    export are deleted, it predicts exactly what it predicted in place. Stage II refuses encoders that changed since
    the extraction (it would ship encoders the model never saw)."""
    export = tmp_path / "stage1" / "export"
    shutil.copytree(encoders, export)
    for split in ("train", "val"):  # these features, as if extracted with that copy (same files, same sha256)
        shutil.copytree(features / split, tmp_path / "features" / split)
        manifest = tmp_path / "features" / split / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "encoders": str(export)}))
    args = [
        "--config",
        "configs/stage2/tiny.yaml",
        f"data.train={tmp_path / 'features' / 'train'}",
        f"data.val={tmp_path / 'features' / 'val'}",
        f"run.output_dir={tmp_path}",
        "run.name=run",
        "data.batch_size=4",
        "train.epochs=1",
    ]

    weights = export / "text" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))

    def train() -> subprocess.CompletedProcess:  # one plain process
        return subprocess.run(
            [sys.executable, str(REPO / "train/stage2.py"), *args],
            cwd=REPO,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    changed = train()
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert f"the encoders in {export} changed since these features were extracted with them" in changed.stderr
    weights.write_bytes(original)
    trained = train()
    assert trained.returncode == 0, trained.stderr[-3000:]
    videos = [
        str(path)
        for path in sorted((synthetic_shards["val"].parents[1] / "synth" / "val" / "videos").glob("*.mp4"))[:3]
    ]
    in_place = predict(tmp_path / "run" / "best", videos)
    assert len(in_place) == 3 and all(len(result["intensities"]) == 6 for result in in_place)
    served = tmp_path / "served"
    shutil.copytree(tmp_path / "run" / "best", served)
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tmp_path / "stage1")
    assert predict(served, videos) == in_place


def test_a_corrupt_sample_is_skipped_counted_and_reported_by_the_trainer(features, tmp_path):
    damaged = tmp_path / "train"
    shutil.copytree(features / "train", damaged)
    shard = sorted(damaged.glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar]
    victim = members[1][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{victim}.vision.npy":
                data = b"\x93NUMPY garbage"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    launch(
        "train/stage2.py",
        [
            "--config",
            "configs/stage2/tiny.yaml",
            f"data.train={damaged}",
            f"data.val={features / 'val'}",
            f"run.output_dir={tmp_path}",
            "run.name=damaged",
            "data.batch_size=4",
            "train.epochs=1",
        ],
    )
    assert "skipped 1 corrupt or unreadable samples" in (tmp_path / "damaged" / "log.txt").read_text()
    assert scalars(tmp_path / "damaged", "train/skipped_samples") == [(1, 0.0), (6, 1.0)]  # first step, epoch end


def test_stage2_trains_on_folds_of_the_data_with_a_pearson_term_and_late_fusion(features, tmp_path):
    common = [
        "--config",
        "configs/stage2/tiny.yaml",
        f"data.train={features / 'train'}",
        f"run.output_dir={tmp_path}",
        "data.batch_size=4",
        "train.epochs=1",
        "train.log_every=1",
        "data.folds=3",
        "data.fold=2",
    ]
    # `emi synth` names the clips of every split 00001, 00002, ...: a union of train and val is refused by key
    refused = subprocess.run(
        [*EMI, "train", "stage2", *common, f"data.val={features / 'val'}", "run.name=refused"],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "clip key '00001' is in" in refused.stderr, refused.stderr[-2000:]
    launch(
        "train/stage2.py",
        [*common, "data.val=null", "run.name=fold", "loss.pearson=1.0", "model.fusion=late", "loss.unimodal=0.5"],
    )
    manifest = json.loads((features / "train" / "manifest.json").read_text())
    folds = fold_of([key for shard in manifest["shards"] for key in shard["keys"]], 3)
    in_fold = sum(fold == 2 for fold in folds.values())
    assert in_fold == 16
    # the other 32 clips train: 16 per rank, 4 steps of 4; the fold is validated, each clip once
    assert scalars(tmp_path / "fold", "val/num_samples") == [(4, float(in_fold))]
    assert len(scalars(tmp_path / "fold", "train/pearson")) == len(scalars(tmp_path / "fold", "train/mse")) == 4
    # late fusion: the loss adds the same terms on each modality's own prediction, times loss.unimodal
    terms = {name: dict(scalars(tmp_path / "fold", f"train/{name}")) for name in ("loss", "mse", "pearson", "unimodal")}
    for step, loss in terms["loss"].items():
        expected = terms["mse"][step] + terms["pearson"][step] + 0.5 * terms["unimodal"][step]
        assert loss == pytest.approx(expected, rel=1e-4) and terms["unimodal"][step] > 0


def test_stage2_resumed_on_one_process_with_the_global_batch_kept_ends_with_the_uninterrupted_weights(
    features, tmp_path
):
    """Two processes checkpoint after 2 of their 6 steps; resumed from there on one process with train.resize=batch
    (batch 4 -> 8, so each step's gathered predictions are the same clips), Stage II ends the epoch with the weights
    and the EMA of the uninterrupted 2-process run, within float rounding. (Later epochs follow the plan of one
    process, other batches.) Dropout off: the new process draws its own random stream."""
    args = [
        "--config",
        "configs/stage2/tiny.yaml",
        f"data.train={features / 'train'}",
        f"data.val={features / 'val'}",
        f"run.output_dir={tmp_path}",
        "run.name=whole",
        "data.batch_size=4",
        "train.epochs=1",
        "train.checkpoint_every=2",
        "train.keep_last=20",
        "train.resize=batch",
        "model.dropout=0.0",
        "model.modality_dropout=0.0",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch("train/stage2.py", args)
    shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns("export", "best"))
    for checkpoint in (resumed / "checkpoints").glob("step-*"):
        if checkpoint.name != "step-00000002":
            shutil.rmtree(checkpoint)
    launch("train/stage2.py", [*args, "run.name=resumed", "--resume", "latest"], num_processes=1)
    log = (resumed / "log.txt").read_text()
    assert "resumed from 2 to 1 processes: global batch 8 kept (train.resize=batch); batch 4 -> 8" in log, log
    for folder in ("export", "best"):
        a, b = (
            load_file(str(whole / folder / "model.safetensors")),
            load_file(str(resumed / folder / "model.safetensors")),
        )
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=2e-5, rtol=1e-4, msg=f"{folder}: {name}")
