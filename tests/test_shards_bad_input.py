"""One folder with good clips and every kind of bad input, one build: each failure named with its reason,
every good clip in the shards."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tarfile
import wave

import numpy as np
import pytest
from PIL import Image

from emi import EMI_EMOTIONS
from emi.cli import main
from emi.shards.stats import shard_stats

from helpers import GRID, ffmpeg

GOOD = [" lead", "bbaf2n", "brbk7n", "noaudio", "padded", "portrait"]


def row(filename: str, **overrides: str) -> list[str]:
    labels = {name: "0.5" for name in EMI_EMOTIONS} | {"Valence": "-0.25", "Expression": "Neutral"} | overrides
    return [filename, *labels.values()]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_input")
    videos = root / "videos"
    videos.mkdir()
    for key in ("bbaf2n", "brbk7n"):
        shutil.copy(GRID / f"{key}.mpg", videos)
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=25:d=1.2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(videos / "noaudio.mp4"),
    )
    Image.fromarray(np.full((80, 60, 3), 200, np.uint8)).save(videos / "portrait.jpg")  # AffectNet-style still
    full = root / "full.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=25:d=1",
        "-f",
        "lavfi",
        "-i",
        "sine=duration=1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        str(full),
    )
    faststart = root / "faststart.mp4"
    ffmpeg("-i", str(full), "-c", "copy", "-movflags", "+faststart", str(faststart))
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notvideo.mp4").write_text("hello, I am text\n")
    (videos / "truncated.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (videos / "cutfast.mp4").write_bytes(faststart.read_bytes()[: faststart.stat().st_size * 2 // 3])
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(videos / "voice.wav"))
    # inputs that name a file outside the folder: FFmpeg must never open it
    secret = root / "secret.ts"
    ffmpeg("-i", str(full), "-c:v", "copy", "-c:a", "copy", "-f", "mpegts", str(secret))
    (videos / "playlist.mp4").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    (videos / "concat.mp4").write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    avi = root / "full.avi"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=25:d=4",
        "-f",
        "lavfi",
        "-i",
        "sine=duration=4",
        "-c:v",
        "mpeg4",
        "-c:a",
        "pcm_s16le",
        str(avi),
    )
    (videos / "cutavi.avi").write_bytes(avi.read_bytes()[: avi.stat().st_size // 2])
    for name in (
        " lead.mp4",
        "padded.mp4",
        "unlabeled.mp4",
        "nanlabel.mp4",
        "textlabel.mp4",
        "emptylabel.mp4",
        "range.mp4",
        "amb.mp4",
        "amb.avi",
        "dotted.name.mp4",
    ):
        shutil.copy(full, videos / name)
    shutil.copy(full, root / "outside.mp4")
    os.symlink(root / "outside.mp4", videos / "link.mp4")
    (videos / "README.txt").write_text("not a clip, not reported\n")
    shutil.copy(full, videos / "dots..name.mp4")
    (videos / "afolder.mp4").mkdir()
    (videos / "bomlist.mp4").write_text("\ufeff#EXTM3U\n#EXTINF:1,\nsecret.ts\n", encoding="utf-8")
    rows = [
        row("bbaf2n.mpg"),
        row("brbk7n"),
        row("noaudio.mp4", Expression="Happiness"),
        row("portrait", Expression="Surprise"),
        row("empty.mp4"),
        row("notvideo.mp4"),
        row("truncated.mp4"),
        row("cutfast.mp4"),
        row("voice.wav"),
        row("ghost.mp4"),
        row("nanlabel.mp4", Valence="nan"),
        row("textlabel.mp4", Joy="high"),
        row("emptylabel.mp4", Amusement=""),
        row("range.mp4", Joy="1.5"),
        row("../outside.mp4"),
        row(str(root / "outside.mp4")),
        row("link.mp4"),
        row("amb"),
        row("dotted.name.mp4"),
        row("playlist.mp4"),
        row("concat.mp4"),
        row("cutavi.avi"),
        row(" lead.mp4"),
        row("  padded.mp4 "),
        row("dots..name"),
        row("afolder.mp4"),
        row("bomlist.mp4"),
    ]
    labels = root / "labels.csv"
    with labels.open("w", newline="") as file:
        csv.writer(file).writerows([["Filename", *EMI_EMOTIONS, "Valence", "Expression"], *rows])
    out = root / "shards"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "shards",
                "build",
                "--videos",
                str(videos),
                "--labels",
                str(labels),
                "--out",
                str(out),
                "--frame-size",
                "64",
            ]
        )
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    return {"root": root, "out": out, "code": code, "summary": stdout.getvalue(), "failures": failures}


EXPECTED_FAILURES = {
    "empty.mp4": "empty file (0 bytes)",
    "notvideo.mp4": "not a media file (it is a text file)",
    "truncated.mp4": "not readable as media: truncated, corrupt or not an accepted format (FFmpeg: moov atom not found",
    "cutfast.mp4": "truncated or corrupt: decoded",
    "voice.wav": "no video stream",
    "ghost.mp4": "clip not found in the videos folder",
    "nanlabel.mp4": "label 'Valence' is 'nan', not a finite number",
    "textlabel.mp4": "label 'Joy' is not a number: 'high'",
    "emptylabel.mp4": "label 'Amusement' is empty",
    "range.mp4": "label 'Joy' = 1.5 is outside [0, 1]",
    "../outside.mp4": "escapes the videos folder ('..' leads outside it)",
    "ABSOLUTE": "absolute path: Filename must be relative to the videos folder",
    "link.mp4": "escapes the videos folder (a symlink to",
    "amb": "ambiguous: several files match (amb.avi, amb.mp4)",
    "dotted.name.mp4": "clip id 'dotted.name' contains '.'",
    "unlabeled.mp4": "no row in labels.csv: clip has no labels",
    "playlist.mp4": "refused: an HLS playlist, which refers to other files or URLs",
    "concat.mp4": "refused: an FFmpeg concat script, which refers to other files or URLs",
    "cutavi.avi": "truncated: its streams end at 1.96 s, the file declares 4.00 s",
    "dots..name.mp4": "clip id 'dots..name' contains '.'",  # named without its extension: found, then refused
    "afolder.mp4": "a folder, not a clip",
    "bomlist.mp4": "refused: an HLS playlist, which refers to other files or URLs",  # a byte-order mark first
}


def test_exit_code_three_and_summary_points_to_the_report(build):
    assert build["code"] == 3
    assert f"{len(GOOD)} samples in 1 train shard(s) in {build['out']}" in build["summary"]
    report = build["out"] / "failures.jsonl"
    assert f"{len(EXPECTED_FAILURES)} clip(s) not built: reasons in {report}" in build["summary"]


def test_every_bad_input_is_reported_with_its_reason(build):
    reasons = {}
    for record in build["failures"]:
        path = "ABSOLUTE" if record["path"] == str(build["root"] / "outside.mp4") else record["path"]
        assert path not in reasons, f"{path} reported twice"
        reasons[path] = record["reason"]
    assert sorted(reasons) == sorted(EXPECTED_FAILURES)
    for path, reason in EXPECTED_FAILURES.items():
        assert reasons[path].startswith(reason), (path, reasons[path])


def test_failures_say_where_they_were_found(build):
    by_path = {record["path"]: record for record in build["failures"]}
    assert by_path["nanlabel.mp4"]["line"] == 12  # header is line 1
    assert by_path["ghost.mp4"]["line"] == 11
    assert by_path["voice.wav"]["key"] == "voice" and "line" not in by_path["voice.wav"]
    assert set(by_path["unlabeled.mp4"]) == {"path", "reason"}


def test_every_good_clip_is_built(build):
    manifest = json.loads((build["out"] / "manifest.json").read_text())
    assert [key for entry in manifest["shards"] for key in entry["keys"]] == sorted(GOOD)
    assert manifest["labels"]["Valence"] == "float" and manifest["labels"]["Expression"] == "str"
    stats = shard_stats(build["out"])
    assert (stats["samples"], stats["failures"], stats["has_audio"]) == (len(GOOD), len(EXPECTED_FAILURES), 4)


def _sample(build: dict, key: str) -> dict[str, bytes]:
    with tarfile.open(build["out"] / "train-000000.tar") as tar:
        return {
            member.name.partition(".")[2]: tar.extractfile(member).read()
            for member in tar
            if member.name.partition(".")[0] == key
        }


def test_clip_without_audio_is_built_with_silence(build):
    sample = _sample(build, "noaudio")
    meta = json.loads(sample["json"])
    assert meta["has_audio"] is False and meta["num_frames"] == 6 and meta["duration_s"] == pytest.approx(1.2)
    assert meta["labels"]["Expression"] == "Happiness" and meta["labels"]["Valence"] == -0.25
    with wave.open(io.BytesIO(sample["wav"])) as wav:
        assert wav.getnframes() == 19200
        assert not np.frombuffer(wav.readframes(19200), "<i2").any()
    assert sorted(name for name in sample if name.endswith(".jpg")) == [f"{i:04d}.jpg" for i in range(6)]


def test_still_image_is_a_one_frame_sample(build):
    sample = _sample(build, "portrait")
    meta = json.loads(sample["json"])
    assert (meta["num_frames"], meta["duration_s"], meta["has_audio"]) == (1, 0.0, False)
    assert meta["labels"]["Expression"] == "Surprise" and meta["source"] == "portrait.jpg"
    assert sorted(sample) == ["0000.jpg", "json", "txt", "wav"]
    assert Image.open(io.BytesIO(sample["0000.jpg"])).size == (64, 86)
    with wave.open(io.BytesIO(sample["wav"])) as wav:
        assert wav.getnframes() == 0 and wav.getframerate() == 16000


def test_filename_with_spaces_matches_as_written_first_then_stripped(build):
    lead = json.loads(_sample(build, " lead")["json"])
    assert lead["source"] == " lead.mp4"
    assert lead["filename_note"] == "Filename ' lead.mp4' matched as written, spaces included"
    padded = json.loads(_sample(build, "padded")["json"])
    assert padded["source"] == "padded.mp4"
    assert padded["filename_note"] == "Filename '  padded.mp4 ' matched 'padded.mp4', without its surrounding spaces"
    assert "filename_note" not in json.loads(_sample(build, "bbaf2n")["json"])


def test_rerun_keeps_the_shard_and_the_failures_of_its_clips(build, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(build["out"], out)
    args = json.loads((out / "manifest.json").read_text())["args"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "shards",
                "build",
                "--videos",
                args["videos"],
                "--labels",
                args["labels"],
                "--out",
                str(out),
                "--frame-size",
                "64",
            ]
        )
    assert code == 3
    assert "(0 written, 1 kept from an earlier build)" in stdout.getvalue()
    assert (out / "failures.jsonl").read_text() == (build["out"] / "failures.jsonl").read_text()


def test_a_build_into_its_own_videos_folder_never_takes_its_shards_for_clips(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for key in ("bbaf2n", "brbk7n"):
        shutil.copy(GRID / f"{key}.mpg", videos)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "Filename,"
        + ",".join(EMI_EMOTIONS)
        + "\n"
        + "".join(f"{key}.mpg," + ",".join(["0.5"] * len(EMI_EMOTIONS)) + "\n" for key in ("bbaf2n", "brbk7n"))
    )
    command = [
        "shards",
        "build",
        "--videos",
        str(videos),
        "--labels",
        str(labels),
        "--out",
        str(videos),
        "--frame-size",
        "64",
    ]
    assert main(command) == 0
    assert main(command) == 0, capsys.readouterr()  # the second run sees its train-000000.tar among the clips
    assert "(0 written, 1 kept from an earlier build)" in capsys.readouterr().out
    assert (videos / "failures.jsonl").read_text() == ""
