"""`emi shards build` and `emi shards stats` on the real GRID clips.

Contents, manifest, determinism, resume after damage or SIGKILL, transcripts, Whisper, face crops, usage errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import wave
from pathlib import Path
from statistics import fmean

import numpy as np
import pytest
import torchaudio
import webdataset as wds
from PIL import Image

from emi import EMI_EMOTIONS
from emi.cli import main
from emi.shards.build import build_shards
from emi.shards.stats import shard_stats

from helpers import EMI, GRID, KEYS, grid_labels, wait_until, write_labels

REPO = Path(__file__).resolve().parents[1]


def grid_subset(folder: Path, keys: list[str]) -> Path:
    """A videos folder with only these GRID clips (the others would be clips without a CSV row)."""
    folder.mkdir()
    for key in keys:
        shutil.copy(GRID / f"{key}.mpg", folder)
    return folder


def shard_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar]


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard in the manifest."""
    samples: dict[str, dict[str, bytes]] = {}
    for entry in json.loads((out / "manifest.json").read_text())["shards"]:
        for name, data in shard_members(out / entry["name"]):
            key, _, extension = name.partition(".")
            samples.setdefault(key, {})[extension] = data
    return samples


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if not path.name.startswith(".")}


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    """The 8 GRID clips, labels (Filename with extensions), built into shards of 3 through the CLI."""
    root = tmp_path_factory.mktemp("grid")
    labels = grid_labels(KEYS)
    labels_csv = write_labels(root / "labels.csv", labels, with_extension=True)
    out = root / "shards"
    code = main(
        [
            "shards",
            "build",
            "--videos",
            str(GRID),
            "--labels",
            str(labels_csv),
            "--out",
            str(out),
            "--shard-size",
            "3",
            "--frame-size",
            "256",
        ]
    )
    return {"root": root, "labels": labels, "labels_csv": labels_csv, "out": out, "code": code}


def test_build_exits_zero_and_writes_three_shards(grid):
    assert grid["code"] == 0
    names = sorted(path.name for path in grid["out"].iterdir() if not path.name.startswith("."))
    assert names == ["failures.jsonl", "manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert (grid["out"] / "failures.jsonl").read_text() == ""


def test_manifest_lists_shards_counts_hashes_and_totals(grid):
    out = grid["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "emi-shards/1" and manifest["split"] == "train"
    assert [entry["name"] for entry in manifest["shards"]] == [f"train-00000{i}.tar" for i in range(3)]
    assert [entry["keys"] for entry in manifest["shards"]] == [KEYS[0:3], KEYS[3:6], KEYS[6:8]]
    assert [entry["num_samples"] for entry in manifest["shards"]] == [3, 3, 2]
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # FFmpeg puts each GRID clip at 2.98 s (the MPEG program stream's timestamps)
    assert (manifest["num_samples"], manifest["num_frames"], manifest["duration_s"]) == (8, 120, 23.84)
    assert manifest["labels"] == {**{name: "float" for name in EMI_EMOTIONS}, "Valence": "float", "Expression": "str"}
    args = manifest["args"]
    assert (args["fps"], args["sample_rate"], args["frame_size"], args["shard_size"]) == (5.0, 16000, 256, 3)
    assert args["videos"] == str(GRID) and args["asr"] == "none" and args["face_crop"] == "none"


def test_each_sample_holds_fifteen_frames_in_order_then_wav_txt_json(grid):
    for entry in json.loads((grid["out"] / "manifest.json").read_text())["shards"]:
        names = [name for name, _ in shard_members(grid["out"] / entry["name"])]
        expected = []
        for key in entry["keys"]:
            expected += [f"{key}.{i:04d}.jpg" for i in range(15)] + [f"{key}.wav", f"{key}.txt", f"{key}.json"]
        assert names == expected


def test_sample_contents_round_trip(grid):
    samples = samples_of(grid["out"])
    assert sorted(samples) == KEYS
    for key, entries in samples.items():
        meta = json.loads(entries["json"])
        assert meta == {
            "key": key,
            "source": f"{key}.mpg",
            "split": "train",
            "fps": 5.0,
            "num_frames": 15,
            "duration_s": 2.98,
            "sample_rate": 16000,
            "has_audio": True,
            "labels": grid["labels"][key],
            "transcript": "",
            "face_crop": {"method": "none"},
        }
        assert entries["txt"] == b""
        with wave.open(io.BytesIO(entries["wav"])) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
            assert wav.getnframes() == 47680
        for i in range(15):
            image = Image.open(io.BytesIO(entries[f"{i:04d}.jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (320, 256)


def test_wav_holds_the_clips_audio(grid):
    key = KEYS[2]
    with wave.open(io.BytesIO(samples_of(grid["out"])[key]["wav"])) as wav:
        stored = np.frombuffer(wav.readframes(wav.getnframes()), "<i2") / 32768.0
    waveform, rate = torchaudio.load(str(GRID / f"{key}.mpg"))
    reference = torchaudio.functional.resample(waveform.mean(0), rate, 16000).numpy()
    n = min(len(stored), len(reference))
    assert np.corrcoef(stored[:n], reference[:n])[0, 1] > 0.9


def test_webdataset_reads_the_shards(grid):
    urls = [str(grid["out"] / f"train-00000{i}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [sample["__key__"] for sample in samples] == KEYS
    assert all(json.loads(sample["json"])["key"] == sample["__key__"] for sample in samples)
    assert sorted(k for k in samples[0] if k.endswith(".jpg")) == [f"{i:04d}.jpg" for i in range(15)]


def test_stats_match_known_contents(grid, capsys):
    stats = shard_stats(grid["out"])
    expected_means = {name: fmean(row[name] for row in grid["labels"].values()) for name in [*EMI_EMOTIONS, "Valence"]}
    assert stats == {
        "split": "train",
        "shards": 3,
        "samples": 8,
        "hours": round(23.84 / 3600, 6),
        "frames": 120,
        "failures": 0,
        "label_means": expected_means,
        "has_audio": 8,
        "transcripts": 0,
    }
    capsys.readouterr()
    assert main(["shards", "stats", str(grid["out"])]) == 0
    assert json.loads(capsys.readouterr().out) == stats


def test_stats_refuse_a_damaged_folder(grid, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(grid["out"], out)
    (out / "train-000001.tar").write_bytes(b"")
    assert main(["shards", "stats", str(out)]) == 2
    assert "train-000001.tar: unreadable shard" in capsys.readouterr().err
    (out / "train-000000.tar").unlink()
    assert main(["shards", "stats", str(out)]) == 2
    assert "train-000000.tar: listed in manifest.json but missing" in capsys.readouterr().err


def test_parallel_build_is_byte_identical(grid, tmp_path):
    summary = build_shards(videos=GRID, labels=grid["labels_csv"], out=tmp_path, shard_size=3, workers=2)
    assert (summary.num_samples, summary.num_failed, summary.shards_written) == (8, 0, 3)
    assert folder_bytes(tmp_path) == folder_bytes(grid["out"])


def test_rerun_rebuilds_only_the_damaged_shards(grid, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(grid["out"], out)
    original = folder_bytes(grid["out"])
    untouched = (out / "train-000000.tar").stat().st_mtime_ns
    damaged = bytearray((out / "train-000001.tar").read_bytes())
    damaged[5000] ^= 0xFF
    (out / "train-000001.tar").write_bytes(bytes(damaged))
    (out / "train-000002.tar").unlink()
    (out / ".train-000003.tar.tmp").write_bytes(b"left by a killed build")
    (out / "train-000007.tar").write_bytes(b"a shard of an older, larger build")
    summary = build_shards(videos=GRID, labels=grid["labels_csv"], out=out, shard_size=3)
    assert (summary.shards_written, summary.shards_kept, summary.rebuild_reason) == (2, 1, None)
    assert (out / "train-000000.tar").stat().st_mtime_ns == untouched
    assert folder_bytes(out) == original
    assert not (out / ".train-000003.tar.tmp").exists()
    again = build_shards(videos=GRID, labels=grid["labels_csv"], out=out, shard_size=3)
    assert (again.shards_written, again.shards_kept) == (0, 3)
    assert "0 written, 3 kept" in again.describe()


def test_changed_arguments_rebuild_everything_and_say_so(grid, tmp_path):
    videos = grid_subset(tmp_path / "videos", KEYS[:2])
    labels = write_labels(tmp_path / "labels.csv", {key: grid["labels"][key] for key in KEYS[:2]})
    out = tmp_path / "shards"
    build_shards(videos=videos, labels=labels, out=out, shard_size=1)
    summary = build_shards(videos=videos, labels=labels, out=out, shard_size=1, fps=2.0)
    assert (summary.shards_written, summary.shards_kept) == (2, 0)
    assert "fps: 5.0 -> 2.0" in summary.rebuild_reason and "rebuilding all shards" in summary.describe()
    assert json.loads(samples_of(out)[KEYS[0]]["json"])["num_frames"] == 6


def test_killed_build_resumes_to_the_clean_result(grid, tmp_path):
    out, clean = tmp_path / "killed", tmp_path / "clean"
    command = [
        *EMI,
        "shards",
        "build",
        "--videos",
        str(GRID),
        "--labels",
        str(grid["labels_csv"]),
        "--out",
        str(out),
        "--shard-size",
        "1",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    wait_until(
        lambda: manifest.exists() and json.loads(manifest.read_text())["shards"], 300, "a first shard", alive=process
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Whatever is there now: every complete-looking shard is one the manifest vouches for.
    listed = {entry["name"]: entry["sha256"] for entry in json.loads(manifest.read_text())["shards"]}
    assert 1 <= len(listed) < 8
    for path in out.glob("train-*.tar"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[path.name]
    assert main(command[3:]) == 0
    assert main(command[3:9] + ["--out", str(clean), "--shard-size", "1"]) == 0
    assert folder_bytes(out) == folder_bytes(clean)


def test_cli_subprocess_builds_and_reports(grid, tmp_path):
    videos = grid_subset(tmp_path / "videos", KEYS[:2])
    labels = write_labels(tmp_path / "labels.csv", {key: grid["labels"][key] for key in KEYS[:2]})
    result = subprocess.run(
        [*EMI, "shards", "build", "--videos", str(videos), "--labels", str(labels), "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert "2 samples in 1 train shard(s)" in result.stdout
    assert "clip/s" in result.stderr  # the progress bar


def test_imported_transcripts_land_in_json_and_txt(grid, tmp_path):
    videos = grid_subset(tmp_path / "videos", KEYS[:2])
    labels = write_labels(tmp_path / "labels.csv", {key: grid["labels"][key] for key in KEYS[:2]})
    transcripts = tmp_path / "transcripts.csv"
    transcripts.write_text(f'Filename,Text\n{KEYS[0]}.mpg,"bin blue at f two now"\n')
    summary = build_shards(videos=videos, labels=labels, out=tmp_path / "out", transcripts=transcripts)
    assert summary.num_failed == 0
    samples = samples_of(tmp_path / "out")
    assert samples[KEYS[0]]["txt"] == b"bin blue at f two now"
    assert json.loads(samples[KEYS[0]]["json"])["transcript"] == "bin blue at f two now"
    assert samples[KEYS[1]]["txt"] == b""
    assert shard_stats(tmp_path / "out")["transcripts"] == 1


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    """A random Whisper with tiny dimensions and a byte-level vocabulary, saved like a hub model."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder = tmp_path_factory.mktemp("tiny_whisper")
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(sorted(ByteLevel.alphabet()))}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    specials = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ["<|endoftext|>", *specials]}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=16,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    # max_length keeps generation short; suppressing end-of-text makes the random model always say something.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=False,
        max_length=12,
        suppress_tokens=[ids["<|endoftext|>"]],
    )
    model.save_pretrained(folder)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_whisper_transcribes_each_clip_with_one_model_load(grid, tiny_whisper, tmp_path, monkeypatch):
    from transformers import WhisperForConditionalGeneration

    loads = []
    original = WhisperForConditionalGeneration.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(WhisperForConditionalGeneration, "from_pretrained", classmethod(counting_from_pretrained))
    keys = KEYS[:3]
    videos = grid_subset(tmp_path / "videos", keys)
    labels = write_labels(tmp_path / "labels.csv", {key: grid["labels"][key] for key in keys})
    transcripts = tmp_path / "transcripts.csv"
    transcripts.write_text(f"Filename,Text\n{keys[0]},imported wins\n")
    summary = build_shards(
        videos=videos, labels=labels, out=tmp_path / "out", asr=f"whisper:{tiny_whisper}", transcripts=transcripts
    )
    assert summary.num_failed == 0
    assert loads == [str(tiny_whisper)]
    samples = samples_of(tmp_path / "out")
    assert samples[keys[0]]["txt"] == b"imported wins"
    for key in keys[1:]:
        text = json.loads(samples[key]["json"])["transcript"]
        assert isinstance(text, str) and text.strip()
        assert samples[key]["txt"].decode() == text


def test_whisper_spec_errors_are_usage_errors(grid, tmp_path, capsys):
    base = ["shards", "build", "--videos", str(GRID), "--labels", str(grid["labels_csv"]), "--out", str(tmp_path)]
    assert main(base + ["--asr", "wav2vec"]) == 2
    assert "--asr must be 'none' or 'whisper:NAME_OR_PATH'" in capsys.readouterr().err
    assert main(base + ["--asr", f"whisper:{tmp_path / 'nothing'}"]) == 2
    assert "cannot load the Whisper model" in capsys.readouterr().err


def _has_haar() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "CascadeClassifier")


@pytest.mark.skipif(not _has_haar(), reason="needs OpenCV with Haar cascades (opencv-python-headless<5)")
def test_face_crop_finds_the_grid_faces(grid, tmp_path):
    keys = KEYS[:2]
    videos = grid_subset(tmp_path / "videos", keys)
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            "-f",
            "lavfi",
            "-i",
            "testsrc=s=160x120:r=25:d=1",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            str(videos / "noface.mp4"),
        ],
        check=True,
    )
    rows = {**{key: grid["labels"][key] for key in keys}, "noface": grid["labels"][keys[0]]}
    labels = write_labels(tmp_path / "labels.csv", rows)
    summary = build_shards(videos=videos, labels=labels, out=tmp_path / "out", face_crop="opencv", frame_size=128)
    assert summary.num_failed == 0
    samples = samples_of(tmp_path / "out")
    for key in keys:
        crop = json.loads(samples[key]["json"])["face_crop"]
        assert crop["method"] == "opencv" and crop["found"] and crop["frames_with_face"] >= 1
        x, y, w, h = crop["box"]
        assert w == h and 60 <= w <= 288 and 0 <= x <= 360 - w and 0 <= y <= 288 - h
        assert Image.open(io.BytesIO(samples[key]["0000.jpg"])).size == (128, 128)
    crop = json.loads(samples["noface"]["json"])["face_crop"]
    assert crop == {"method": "opencv", "found": False, "frames_checked": 5}
    assert Image.open(io.BytesIO(samples["noface"]["0000.jpg"])).size == (170, 128)


def test_face_crop_without_haar_is_a_usage_error(grid, tmp_path, capsys, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.0.0"))
    code = main(
        [
            "shards",
            "build",
            "--videos",
            str(GRID),
            "--labels",
            str(grid["labels_csv"]),
            "--out",
            str(tmp_path),
            "--face-crop",
            "opencv",
        ]
    )
    assert code == 2
    assert "Haar cascades" in capsys.readouterr().err


def test_usage_errors_exit_two_with_a_message(grid, tmp_path, capsys):
    labels = grid["labels_csv"]
    no_filename = tmp_path / "no_filename.csv"
    no_filename.write_text("Clip,Joy\na,0.5\n")
    duplicate = tmp_path / "duplicate.csv"
    duplicate.write_text(f"Filename,Joy\n{KEYS[0]},0.5\n{KEYS[1]},0.1\n{KEYS[0]},0.2\n")
    same_clip = tmp_path / "same_clip.csv"
    same_clip.write_text(f"Filename,Joy\n{KEYS[0]},0.5\n{KEYS[0]}.mpg,0.2\n")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage\x00\x81")
    other_split = tmp_path / "other_split"
    other_split.mkdir()
    (other_split / "manifest.json").write_text(json.dumps({"format": "emi-shards/1", "split": "val", "shards": []}))
    cases = [
        (["--videos", str(tmp_path / "missing"), "--labels", str(labels)], "no such folder"),
        (["--videos", str(GRID), "--labels", str(tmp_path / "missing.csv")], "CSV file not found"),
        (["--videos", str(GRID), "--labels", str(no_filename)], "no 'Filename' column"),
        (["--videos", str(GRID), "--labels", str(duplicate)], "duplicate Filename"),
        (["--videos", str(GRID), "--labels", str(same_clip)], "both name clip id"),
        (["--videos", str(GRID), "--labels", str(binary)], "unreadable CSV"),
        (["--videos", str(GRID), "--labels", str(labels), "--frame-size", "255"], "--frame-size"),
        (
            ["--videos", str(GRID), "--labels", str(labels), "--out", str(labels / "sub")],
            f"{labels} exists and is not a folder",
        ),
        (["--videos", str(GRID), "--labels", str(labels), "--transcripts", str(no_filename)], "no 'Filename'"),
    ]
    for extra, message in cases:
        assert main(["shards", "build", "--out", str(tmp_path / "out"), *extra]) == 2, message
        assert message in capsys.readouterr().err
    assert main(["shards", "build", "--videos", str(GRID), "--labels", str(labels), "--out", str(other_split)]) == 2
    assert "holds the 'val' split" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"someone else's shard")
    assert main(["shards", "build", "--videos", str(GRID), "--labels", str(labels), "--out", str(foreign)]) == 2
    assert "has shards but no manifest.json" in capsys.readouterr().err
    assert (foreign / "train-000000.tar").read_bytes() == b"someone else's shard"
    assert main(["shards", "stats", str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_stops_with_exit_three_no_temporary_file_and_a_rerun_continues(grid, tmp_path, workers):
    out, clean = tmp_path / "small", tmp_path / "clean"
    out.mkdir()
    if not _mount_tmpfs(out, "1m"):
        pytest.skip("a full disk needs a small tmpfs, which only root may mount here")
    try:
        command = [
            *EMI,
            "shards",
            "build",
            "--videos",
            str(GRID),
            "--labels",
            str(grid["labels_csv"]),
            "--out",
            str(out),
            "--shard-size",
            "1",
            "--workers",
            str(workers),
        ]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 3, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        message = [line for line in result.stderr.splitlines() if line.startswith("emi: error:")]
        assert len(message) == 1 and "No space left on device" in message[0], result.stderr[-3000:]
        assert "run the same command again to continue" in message[0]
        names = sorted(path.name for path in out.iterdir())
        assert not [name for name in names if name.endswith(".tmp") or name == ".emi-parts"], names
        listed = {entry["name"]: entry["sha256"] for entry in json.loads((out / "manifest.json").read_text())["shards"]}
        # one worker writes a shard before it decodes the next clip; two may fill the disk with clips in flight
        assert (1 if workers == 1 else 0) <= len(listed) < 8
        assert f"stopped with {len(listed)} complete shard(s)" in message[0]
        for name, sha256 in listed.items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha256
        assert subprocess.run(["mount", "-o", "remount,size=16m", str(out)]).returncode == 0  # free space
        rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"({8 - len(listed)} written, {len(listed)} kept" in rerun.stdout
        assert main(command[3:9] + ["--out", str(clean), "--shard-size", "1"]) == 0
        assert folder_bytes(out) == folder_bytes(clean)
    finally:
        subprocess.run(["umount", str(out)])


def test_killing_the_builder_kills_its_workers(tmp_path):
    psutil = pytest.importorskip("psutil")
    videos = tmp_path / "videos"
    videos.mkdir()
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=s=480x270:r=25:d=30",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            str(videos / "a.mp4"),
        ],
        check=True,
    )
    for name in "bcd":
        shutil.copy(videos / "a.mp4", videos / f"{name}.mp4")
    labels = tmp_path / "labels.csv"
    labels.write_text("Filename,Joy\n" + "".join(f"{name}.mp4,0.5\n" for name in "abcd"))
    # every frame at 25 fps: each clip keeps a worker busy for seconds
    process = subprocess.Popen(
        [
            *EMI,
            "shards",
            "build",
            "--videos",
            str(videos),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--fps",
            "25",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "out" / ".emi-parts"
    wait_until(
        lambda: len(list(parts.glob("*.part")) if parts.is_dir() else []) >= 2,
        300,
        "both workers writing a clip",
        alive=process,
    )
    workers = psutil.Process(process.pid).children(recursive=True)
    assert len(workers) >= 2 and process.poll() is None
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)  # the kernel kills them at once; a loaded machine reaps late
    for worker in alive:
        worker.kill()
    assert not alive, f"workers {[worker.pid for worker in alive]} outlived the builder"
