"""`emi evaluate` and `emi predict` with tiny random encoders and fusion model on real GRID clips."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from emi import EMI_EMOTIONS
from emi.cli import main
from emi.errors import UsageError
from emi.io import folder_files
from emi.metrics import emi_report
from emi.models.fusion import fusion_inputs, present_modalities
from emi.models.fusion_checkpoint import load_fusion
from emi.serve.ensemble import load_ensemble
from emi.serve.evaluate import evaluate
from emi.serve.features import load_frozen_encoders
from emi.serve.predict import predict
from emi.serve.robustness import corrupted
from emi.serve.scoring import shard_predictions

from helpers import (
    CLIPS,
    EMI,
    NUM_FRAMES,
    REPO,
    cpu_env,
    direct_batches,
    flat_loader,
    launch_command,
    model_predictions,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def reports(checkpoint, clip_shards, feature_shards, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("eval")
    return {
        kind: (
            evaluate(
                checkpoint, str(shards), out=root / kind / "report.json", batch_size=3, tb=root / kind / "tb", workers=0
            ),
            root / kind,
        )
        for kind, shards in (("features", feature_shards), ("clips", clip_shards))
    }


def direct_report(
    checkpoint: Path, encoders: Path, clip_shards: Path, labels: dict[str, list[float]], batch_size: int
) -> dict:
    """The metrics computed by hand: emi_report of the model on fusion_batch of clip_features, each clip once."""
    model, _ = load_fusion(checkpoint)
    preds = {}
    for batch, features in direct_batches(encoders, clip_shards, batch_size):
        for key, pred in zip(batch["key"], model_predictions(model, features)):
            preds.setdefault(key, pred)
    assert sorted(preds) == sorted(labels)
    return emi_report(torch.stack([preds[key] for key in labels]), torch.tensor(list(labels.values())))


def test_features_and_clips_give_the_same_report(reports, checkpoint, encoders, clip_shards, labels):
    features, clips = reports["features"][0], reports["clips"][0]
    assert features["num_samples"] == clips["num_samples"] == len(CLIPS)
    for name in EMI_EMOTIONS:
        assert features[f"pearson/{name}"] == pytest.approx(clips[f"pearson/{name}"], abs=1e-3)
    assert features["mse"] == pytest.approx(clips["mse"], abs=1e-5)
    direct = direct_report(checkpoint, encoders, clip_shards, labels, batch_size=3)
    assert float(np.std([direct[f"pearson/{n}"] for n in EMI_EMOTIONS])) > 0.1  # not all alike: a real check
    for key, value in direct.items():
        assert clips[key] == pytest.approx(value, abs=1e-6), key
        assert features[key] == pytest.approx(value, abs=1e-3), key
    for report in (features, clips):
        assert report["checkpoint"] == str(checkpoint.resolve())


def test_report_figure_and_tensorboard_written(reports, feature_shards):
    report, folder = reports["features"]
    assert report["shards"] == str(feature_shards)
    assert json.loads((folder / "report.json").read_text()) == report
    with Image.open(folder / "report.png") as image:
        image.verify()
    with Image.open(folder / "report.png") as image:
        assert image.format == "PNG" and image.size == (1200, 800)
    events = list((folder / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    expected = {f"eval/test/{key}": value for key, value in report.items() if isinstance(value, (int, float))}
    assert set(accumulator.Tags()["scalars"]) == set(expected)
    for tag, value in expected.items():
        assert accumulator.Scalars(tag)[0].value == pytest.approx(value, rel=1e-6)


@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("videos")
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("not a video at all\n")
    (root / "playlist.mp4").write_text(f"#EXTM3U\n#EXTINF:3.0,\n{CLIPS[1]}\n#EXT-X-ENDLIST\n")
    (root / "folder").mkdir()
    return [
        str(CLIPS[0]),
        str(root / "empty.mp4"),
        str(CLIPS[3]),
        str(root / "notes.mp4"),
        str(root / "missing.mp4"),
        str(root / "folder"),
        str(root / "playlist.mp4"),
        str(CLIPS[5]),
    ]


def test_predict_matches_evaluate_on_the_same_clips(checkpoint, clip_shards, predict_inputs):
    results = predict(checkpoint, predict_inputs, batch_size=2)
    assert [result["file"] for result in results] == predict_inputs
    errors = {Path(result["file"]).name: result["error"] for result in results if "error" in result}
    assert errors == {
        "empty.mp4": "empty file (0 bytes)",
        "notes.mp4": "not a media file (it is a text file)",
        "missing.mp4": "file not found",
        "folder": "is a directory, not a media file",
        "playlist.mp4": "refused: an HLS playlist, which refers to other files or URLs (only "
        "self-contained media is read)",
    }
    keys, preds, _, skipped = shard_predictions(load_ensemble([checkpoint]), str(clip_shards), batch_size=3, workers=0)
    assert skipped == 0 and preds.shape == (1, len(CLIPS), len(EMI_EMOTIONS))
    from_shards = dict(zip(keys, preds[0].tolist()))
    predicted = [result for result in results if "error" not in result]
    assert [Path(result["file"]).stem for result in predicted] == [CLIPS[i].stem for i in (0, 3, 5)]
    for result in predicted:
        assert list(result["intensities"]) == list(EMI_EMOTIONS)
        values = list(result["intensities"].values())
        assert all(0.0 <= v <= 1.0 for v in values)
        np.testing.assert_allclose(values, from_shards[Path(result["file"]).stem], atol=1e-4)
    assert results[0]["intensities"] != results[2]["intensities"]


def test_cli_evaluate_defaults_and_exit_codes(checkpoint, feature_shards, encoders, tmp_path, capsys):
    folder = tmp_path / "best"
    shutil.copytree(checkpoint, folder)
    assert main(["evaluate", "--checkpoint", str(folder), "--shards", str(feature_shards), "--workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((folder / "eval" / "test.json").read_text())
    assert printed["num_samples"] == len(CLIPS) and printed["num_skipped"] == 0
    assert (folder / "eval" / "test.png").is_file() and list((folder / "eval" / "tb").glob("events.out.tfevents.*"))

    other_labels = save_checkpoint(tmp_path / "valence", encoders, ["Valence", "Joy"])
    assert main(["evaluate", "--checkpoint", str(other_labels), "--shards", str(feature_shards)]) == 2
    assert "carry no labels ['Valence']" in capsys.readouterr().err

    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    assert main(["evaluate", "--checkpoint", str(not_a_checkpoint), "--shards", str(feature_shards)]) == 2
    assert f"{not_a_checkpoint}: not a fusion checkpoint" in capsys.readouterr().err

    (folder / "model.safetensors").write_bytes(b"damaged")
    assert main(["evaluate", "--checkpoint", str(folder), "--shards", str(feature_shards)]) == 2
    assert f"{folder}: not a usable fusion checkpoint" in capsys.readouterr().err


def test_evaluate_exits_partial_and_counts_the_clips_it_could_not_read(checkpoint, feature_shards, tmp_path, capsys):
    """A shard cut inside its second clip: its last two clips are lost, the other six scored; exit code 3."""
    shards = tmp_path / "test"
    shutil.copytree(feature_shards, shards)
    shard = shards / json.loads((feature_shards / "manifest.json").read_text())["shards"][1]["name"]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    shard.write_bytes(shard.read_bytes()[: second.offset_data + second.size // 2])
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(checkpoint),
                "--shards",
                str(shards),
                "--workers",
                "0",
                "--out",
                str(tmp_path / "report.json"),
            ]
        )
        == 3
    )
    printed = json.loads(capsys.readouterr().out)
    assert (printed["num_samples"], printed["num_skipped"]) == (len(CLIPS) - 2, 2)
    assert json.loads((tmp_path / "report.json").read_text()) == printed


def test_cli_predict_exit_codes(checkpoint, predict_inputs, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(checkpoint), *predict_inputs[:2]]) == 3
    printed = json.loads(capsys.readouterr().out)
    assert [sorted(result) for result in printed] == [["file", "intensities"], ["error", "file"]]
    assert main(["predict", "--checkpoint", str(checkpoint), "--asr", "none", predict_inputs[0]]) == 0
    assert json.loads(capsys.readouterr().out)[0]["intensities"] == pytest.approx(printed[0]["intensities"])
    assert main(["predict", "--checkpoint", str(tmp_path), predict_inputs[0]]) == 2
    assert "not a fusion checkpoint" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), "--asr", "whisper", predict_inputs[0]]) == 2
    assert "--asr must be 'none' or 'whisper:NAME_OR_PATH'" in capsys.readouterr().err


def test_a_checkpoint_carries_its_encoders_and_refuses_changed_ones(
    checkpoint, encoders, predict_inputs, tmp_path, capsys
):
    """best/encoders/ holds hard links to the export's files (no space used here); a copy of the checkpoint whose
    encoder weights were altered is refused, naming the file, rather than predicting with other encoders."""
    weights = Path("vision") / "model.safetensors"
    names = folder_files(encoders)
    assert weights.as_posix() in names
    assert all((checkpoint / "encoders" / name).samefile(encoders / name) for name in names)
    altered = tmp_path / "best"
    shutil.copytree(checkpoint, altered)
    data = bytearray((altered / "encoders" / weights).read_bytes())
    data[-1] ^= 1
    (altered / "encoders" / weights).write_bytes(bytes(data))
    assert main(["predict", "--checkpoint", str(altered), predict_inputs[0]]) == 2
    assert (
        f"{altered / 'encoders'}: not the encoders this checkpoint was trained with ({weights.as_posix()}: its "
        "sha256 differs from when it was written)"
    ) in capsys.readouterr().err
    (altered / "encoders" / weights).unlink()  # a folder where the file was: said so, not "missing"
    (altered / "encoders" / weights).mkdir()
    assert main(["predict", "--checkpoint", str(altered), predict_inputs[0]]) == 2
    assert f"({weights.as_posix()}: a folder, where a file was written)" in capsys.readouterr().err


def test_evaluate_needs_the_manifest_of_the_shards(checkpoint, clip_shards, tmp_path):
    shutil.copy(clip_shards / "test-000000.tar", tmp_path)
    with pytest.raises(UsageError, match=re.escape(f"no manifest.json lists shard {tmp_path / 'test-000000.tar'}")):
        evaluate(checkpoint, str(tmp_path / "test-000000.tar"), out=tmp_path / "report.json")
    given = evaluate(
        checkpoint,
        f"pipe:cat {tmp_path / 'test-000000.tar'}",
        out=tmp_path / "report.json",
        manifest=clip_shards / "manifest.json",
        workers=0,
    )
    assert given["num_samples"] == 3  # the first shard's clips


def test_evaluate_names_a_clip_without_a_label(checkpoint, feature_shards, tmp_path):
    shards = tmp_path / "test"
    shutil.copytree(feature_shards, shards)
    name = json.loads((feature_shards / "manifest.json").read_text())["shards"][0]["name"]
    edited = None  # the key of the first clip, rewritten without its Joy label
    with tarfile.open(feature_shards / name) as source, tarfile.open(shards / name, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(".json") and edited is None:
                meta = json.loads(data)
                del meta["labels"]["Joy"]
                data, edited = json.dumps(meta).encode(), meta["key"]
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    with pytest.raises(UsageError, match=re.escape(f"{shards}: clip '{edited}' has no label ['Joy']")):
        evaluate(checkpoint, str(shards), out=tmp_path / "report.json", workers=0)


def read_predictions(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    header, *rows = [line.split(",") for line in path.read_text().splitlines()]
    return header, [row[0] for row in rows], np.array([[float(v) for v in row[1:]] for row in rows])


@pytest.mark.parametrize("source", ["videos", "shards"])
def test_batch_predict_on_two_ranks_equals_one_process(checkpoint, clip_shards, source, tmp_path):
    """`emi predict --videos DIR|--shards URL --out CSV` under accelerate launch on 2 CPU ranks: the CSV of one
    process (challenge layout, input order, every clip once) and the same failures report; bad files exit 3."""
    if source == "videos":
        folder = tmp_path / "videos"
        folder.mkdir()
        for clip in CLIPS[:5]:
            shutil.copy(clip, folder)
        (folder / "broken.mp4").write_bytes(CLIPS[0].read_bytes()[:3000])
        (folder / "notes.mp4").write_text("not a video at all\n")
        inputs, expected_code = ["--videos", str(folder)], 3
        expected_ids = [clip.stem for clip in CLIPS[:5]]
    else:
        inputs, expected_code = ["--shards", str(clip_shards)], 0
        expected_ids = [clip.stem for clip in CLIPS]
    # one clip per encoder call on both sides: the same arithmetic, so the same values to the last digit
    common = ["predict", "--checkpoint", str(checkpoint), *inputs, "--batch-size", "1", "--workers", "0"]
    assert main([*common, "--out", str(tmp_path / "one.csv")]) == expected_code
    ranks = subprocess.run(
        launch_command("-m", ["emi.cli", *common, "--out", str(tmp_path / "two.csv")], 2),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expected_code == 0:
        assert ranks.returncode == 0, ranks.stderr[-4000:]
    else:  # torchrun exits 1 when a rank exits non-zero, and says the rank's own code
        assert ranks.returncode == 1 and re.search(r"exitcode\s+: 3 ", ranks.stderr), ranks.stderr[-4000:]
    assert ranks.stdout.count("clip(s) predicted into") == 1, ranks.stdout  # the summary, once

    header, ids, values = read_predictions(tmp_path / "one.csv")
    assert header == ["Filename", *EMI_EMOTIONS]
    assert ids == expected_ids
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    report = json.loads((tmp_path / "one.failures.json").read_text())
    assert report == json.loads((tmp_path / "two.failures.json").read_text())
    if source == "videos":
        assert [Path(failure["file"]).name for failure in report["failures"]] == ["broken.mp4", "notes.mp4"]
        assert report["failures"][1]["reason"] == "not a media file (it is a text file)"
        assert (report["num_predicted"], report["num_failed"]) == (5, 2)
    else:
        keys, preds, _, _ = shard_predictions(load_ensemble([checkpoint]), str(clip_shards), batch_size=1, workers=0)
        np.testing.assert_allclose(values, preds[0][[keys.index(i) for i in ids]].numpy(), atol=5e-7)  # 6 decimals


def test_evaluate_on_two_ranks_scores_every_clip_once_and_rank_0_writes(checkpoint, feature_shards, reports, tmp_path):
    """`accelerate launch -m emi.cli evaluate` on 2 CPU ranks: each rank scores its share, the report is the one
    process's, printed once, with a line saying where it went."""
    out = tmp_path / "two.json"
    ranks = subprocess.run(
        launch_command(
            "-m",
            [
                "emi.cli",
                "evaluate",
                "--checkpoint",
                str(checkpoint),
                "--shards",
                str(feature_shards),
                "--out",
                str(out),
                "--tb",
                str(tmp_path / "tb"),
                "--batch-size",
                "3",
                "--workers",
                "0",
            ],
            2,
        ),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ranks.returncode == 0, ranks.stderr[-4000:]
    one, _ = reports["features"]
    two = json.loads(out.read_text())
    assert two["num_samples"] == one["num_samples"] == len(CLIPS) and two["num_skipped"] == 0
    for key in ("mean_pearson", "mse", *(f"pearson/{name}" for name in EMI_EMOTIONS)):
        # the ranks batch the clips otherwise: the same model on the same features, rounded otherwise
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert json.loads(ranks.stdout) == two  # printed by one rank
    assert ranks.stderr.count(f"emi evaluate: report {out}, figure {tmp_path / 'two.png'}") == 1, ranks.stderr
    assert (tmp_path / "two.png").is_file() and list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_audio_windows_lie_on_the_encoders_frame_grid(encoders, monkeypatch):
    """windowed_audio_features: one pass for a clip within one window (bit-identical); over several windows the
    frames are exactly one pass's frames (shown on the convolutional features, which see no attention)."""
    from emi.models.encoders import audio_frame_features, normalise_waveform
    from emi.serve import features

    audio_encoder = load_frozen_encoders(encoders).audio
    torch.manual_seed(0)
    waveform = torch.randn(2, 16000 * 7 + 123)
    mask = torch.ones_like(waveform, dtype=torch.long)
    mask[1, 16000 * 4 + 77 :] = 0  # the second clip is shorter: padding inside the windows
    with torch.no_grad():
        whole = audio_frame_features(audio_encoder, waveform, mask)
        assert all(
            torch.equal(a, b) for a, b in zip(features.windowed_audio_features(audio_encoder, waveform, mask), whole)
        )

        def conv_features(encoder, values, attention_mask, extractor=None, prepare=True):  # the grid, no attention
            states = encoder.feature_extractor(values).transpose(1, 2)
            lengths = encoder._get_feat_extract_output_lengths(attention_mask.sum(-1))
            return states, torch.arange(states.shape[1])[None, :] < lengths[:, None]

        monkeypatch.setattr(features, "audio_frame_features", conv_features)
        normalised = normalise_waveform(waveform, mask)
        one_pass = conv_features(audio_encoder, normalised, mask)
        for window_s in (1.0, 2.02, 3.3):
            windowed = features.windowed_audio_features(audio_encoder, waveform, mask, window_s=window_s)
            assert windowed[0].shape == one_pass[0].shape == (2, 350, 32)
            torch.testing.assert_close(windowed[0], one_pass[0], rtol=0, atol=1e-5)
            assert torch.equal(windowed[1], one_pass[1]) and windowed[1].sum(1).tolist() == [350, 199]


PEAK_RSS = """
import sys
from emi.serve.predict import predict
result = predict(sys.argv[1], [sys.argv[2]], batch_size=1)[0]
assert "intensities" in result, result
print([int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
"""


def test_predict_memory_does_not_grow_with_the_clips_length(checkpoint, tmp_path):
    """Peak RSS of `predict` on a 3-minute clip within 1.25x of a 10-second one (tiny encoders): frames are decoded
    and encoded in chunks, the audio in windows. (Measured: 1.12x; with every frame decoded at once and the whole
    waveform in one pass, as before, 1.28x: most of the 1 GB peak is the libraries, the same for both clips.)"""
    peaks = {}
    for seconds in (10, 180):
        clip = tmp_path / f"{seconds}s.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-nostdin",
                "-f",
                "lavfi",
                "-i",
                f"testsrc=s=320x240:r=25:d={seconds}",
                "-f",
                "lavfi",
                "-i",
                f"sine=frequency=300:duration={seconds}",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-pix_fmt",
                "yuv420p",
                "-c:a",
                "aac",
                str(clip),
            ],
            check=True,
        )
        run = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(checkpoint), str(clip)],
            cwd=REPO,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        peaks[seconds] = int(run.stdout.split()[-1])  # kB
    assert peaks[180] <= 1.25 * peaks[10], peaks


@pytest.fixture(scope="module")
def second_checkpoint(encoders, clip_shards, tmp_path_factory) -> Path:
    ((_, features),) = direct_batches(encoders, clip_shards, batch_size=len(CLIPS))
    return save_checkpoint(tmp_path_factory.mktemp("second"), encoders, list(EMI_EMOTIONS), features, seed=1)


def test_an_ensemble_averages_its_members_and_reports_each(
    checkpoint, second_checkpoint, feature_shards, reports, tmp_path, capsys
):
    single = reports["features"][0]
    alone = evaluate(second_checkpoint, str(feature_shards), out=tmp_path / "second.json", workers=0)
    both = evaluate([checkpoint, second_checkpoint], str(feature_shards), out=tmp_path / "both.json", workers=0)
    assert [member["checkpoint"] for member in both["members"]] == [
        str(checkpoint.resolve()),
        str(second_checkpoint.resolve()),
    ]
    assert single["members"][0]["mean_pearson"] == single["mean_pearson"]  # one checkpoint: an ensemble of one
    for member, report in zip(both["members"], (single, alone)):  # (single: batches of 3, padded otherwise)
        assert member["mean_pearson"] == pytest.approx(report["mean_pearson"], abs=1e-6)
    _, preds, target, _ = shard_predictions(
        load_ensemble([checkpoint, second_checkpoint]), str(feature_shards), workers=0
    )
    assert preds.shape[0] == 2 and not torch.allclose(preds[0], preds[1])
    assert both["mean_pearson"] == pytest.approx(emi_report(preds.mean(0), target)["mean_pearson"], abs=1e-9)
    assert both["mean_pearson"] not in (single["mean_pearson"], alone["mean_pearson"])

    # an ensemble folder, made by `emi ensemble`, lists the members relative to itself; its report lands in it
    folder = tmp_path / "ensemble"
    assert (
        main(
            ["ensemble", "--out", str(folder), "--checkpoint", str(checkpoint), "--checkpoint", str(second_checkpoint)]
        )
        == 0
    )
    capsys.readouterr()
    members = json.loads((folder / "ensemble.json").read_text())["members"]
    assert all(not Path(member).is_absolute() for member in members)
    assert main(["evaluate", "--checkpoint", str(folder), "--shards", str(feature_shards), "--workers", "0"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert from_folder == json.loads((folder / "eval" / "test.json").read_text())
    assert from_folder["mean_pearson"] == both["mean_pearson"] and from_folder["checkpoint"] == str(folder.resolve())

    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(checkpoint),
                "--checkpoint",
                str(second_checkpoint),
                "--shards",
                str(feature_shards),
            ]
        )
        == 2
    )
    assert "several --checkpoint: give --out" in capsys.readouterr().err


def test_ensemble_members_must_read_the_same_features_and_predict_the_same_labels(
    checkpoint, encoders, tmp_path, capsys
):
    reordered = save_checkpoint(tmp_path / "reordered", encoders, list(reversed(EMI_EMOTIONS)))
    assert (
        main(
            [
                "ensemble",
                "--out",
                str(tmp_path / "mixed"),
                "--checkpoint",
                str(checkpoint),
                "--checkpoint",
                str(reordered),
            ]
        )
        == 2
    )
    assert f"{reordered / 'config.json'}: differs from {checkpoint} in ['labels']" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ensemble.json").write_text('{"format": "emi-ensemble/1", "members": []}')
    assert main(["predict", "--checkpoint", str(tmp_path / "bad"), str(CLIPS[0])]) == 2
    assert "'members': [checkpoint folders]" in capsys.readouterr().err


def test_predict_with_an_ensemble_averages_the_members(checkpoint, second_checkpoint, predict_inputs):
    videos = [predict_inputs[0], predict_inputs[2]]
    each = [predict(member, videos) for member in (checkpoint, second_checkpoint)]
    both = predict([checkpoint, second_checkpoint], videos)
    for index, result in enumerate(both):
        expected = [
            (a + b) / 2 for a, b in zip(each[0][index]["intensities"].values(), each[1][index]["intensities"].values())
        ]
        np.testing.assert_allclose(list(result["intensities"].values()), expected, atol=1e-6)


def test_batch_predict_with_an_ensemble_writes_the_members_mean(
    checkpoint, second_checkpoint, feature_shards, tmp_path, capsys
):
    """`emi predict --shards ... --out CSV` with two --checkpoint: each row the mean of the members' rows."""
    common = ["predict", "--shards", str(feature_shards), "--workers", "0"]
    for name, members in (("a", [checkpoint]), ("b", [second_checkpoint]), ("both", [checkpoint, second_checkpoint])):
        flags = [arg for member in members for arg in ("--checkpoint", str(member))]
        assert main([*common, *flags, "--out", str(tmp_path / f"{name}.csv")]) == 0
    capsys.readouterr()
    (_, ids_a, a), (_, ids_b, b), (header, ids, both) = (
        read_predictions(tmp_path / f"{name}.csv") for name in ("a", "b", "both")
    )
    assert header == ["Filename", *EMI_EMOTIONS] and ids == ids_a == ids_b and len(ids) == len(CLIPS)
    assert not np.allclose(a, b)
    np.testing.assert_allclose(both, (a + b) / 2, atol=1.5e-6)  # rows written to 6 decimals
    report = json.loads((tmp_path / "both.failures.json").read_text())
    assert report["members"] == [str(checkpoint), str(second_checkpoint)] and report["checkpoint"] is None


def test_corruption_keeps_each_clips_scale_and_draws_by_key():
    generator = torch.Generator().manual_seed(0)
    mask = torch.arange(40)[None, :] < torch.tensor([40, 25])[:, None]
    audio = torch.where(mask[..., None], 3 + 2 * torch.randn(2, 40, 16, generator=generator), 0.0)
    batch = {"key": ["a", "b"], "audio": audio, "audio_mask": mask, "text": torch.randn(2, 8, generator=generator)}
    noisy = corrupted(batch, ["audio", "text"])
    assert torch.equal(batch["audio"], audio)  # the input is left alone
    for index in (0, 1):
        valid, original = noisy["audio"][index][mask[index]], audio[index][mask[index]]
        assert (valid - original).abs().mean() > 1  # replaced, not perturbed
        assert valid.mean().item() == pytest.approx(original.mean().item(), abs=0.15)
        assert valid.std().item() == pytest.approx(original.std().item(), rel=0.1)
    assert (noisy["audio"][1][~mask[1]] == 0).all()  # padding stays padding
    assert not torch.equal(noisy["text"], batch["text"])
    alone = corrupted({key: value[1:] for key, value in batch.items() if key != "key"} | {"key": ["b"]}, ["audio"])
    assert torch.equal(alone["audio"][0], noisy["audio"][1])  # the same clip gets the same noise in any batch


def test_evaluate_with_a_modality_dropped_or_corrupted(checkpoint, feature_shards, reports, tmp_path, capsys):
    model, record = load_fusion(checkpoint)
    data = flat_loader(
        str(feature_shards),
        mode="features",
        batch_size=3,
        num_workers=0,
        world_size=1,
        rank=0,
        seed=0,
        shuffle=False,
        train=False,
        num_frames=NUM_FRAMES,
        label_names=record.labels,
        persistent_workers=False,
    )
    data.set_epoch(0)
    by_hand = {}
    for batch in data.dataloader:
        present = present_modalities(batch)
        present[:, 1] = False
        with torch.no_grad():
            for key, pred in zip(batch["key"], model(**fusion_inputs(batch, present))["pred"]):
                by_hand.setdefault(key, pred)
    keys, preds, target, _ = shard_predictions(
        load_ensemble([checkpoint]), str(feature_shards), workers=0, drop=["audio"]
    )
    torch.testing.assert_close(preds[0], torch.stack([by_hand[key] for key in keys]))

    folder = tmp_path / "best"
    shutil.copytree(checkpoint, folder)
    clean = reports["features"][0]["mean_pearson"]
    scores = {}
    for flag in ("--drop", "--corrupt"):
        assert (
            main(
                [
                    "evaluate",
                    "--checkpoint",
                    str(folder),
                    "--shards",
                    str(feature_shards),
                    "--workers",
                    "0",
                    flag,
                    "audio",
                ]
            )
            == 0
        )
        report = json.loads(capsys.readouterr().out)
        name = flag.strip("-")
        assert report == json.loads((folder / "eval" / f"test-{name}-audio.json").read_text())
        assert report[name] == ["audio"] and report["mean_pearson"] != clean
        scores[name] = report["mean_pearson"]
    assert scores["drop"] == pytest.approx(emi_report(preds[0], target)["mean_pearson"], abs=1e-9)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(folder),
                "--shards",
                str(feature_shards),
                "--workers",
                "0",
                "--corrupt",
                "audio",
                "--out",
                str(tmp_path / "again.json"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["mean_pearson"] == scores["corrupt"]  # the same noise every run
    assert main(["evaluate", "--checkpoint", str(folder), "--shards", str(feature_shards), "--drop", "smell"]) == 2
    assert (
        "--drop and --corrupt take modalities among ['vision', 'audio', 'text'], got 'smell'" in capsys.readouterr().err
    )
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(folder),
                "--shards",
                str(feature_shards),
                "--drop",
                "audio",
                "--corrupt",
                "audio",
            ]
        )
        == 2
    )
    assert "either dropped or corrupted" in capsys.readouterr().err


def test_dropping_or_corrupting_a_modality_the_model_does_not_read_changes_nothing(
    encoders, clip_shards, feature_shards, tmp_path
):
    """A model without vision scores the same with the vision dropped or replaced by noise; with its audio replaced by
    noise (the clips have no transcript: the audio is all it reads) its score moves."""
    ((_, features),) = direct_batches(encoders, clip_shards, batch_size=len(CLIPS))
    blind = save_checkpoint(
        tmp_path / "audio-text", encoders, list(EMI_EMOTIONS), features, modalities=["audio", "text"]
    )
    flags = {
        "clean": {},
        "drop": {"drop": ["vision"]},
        "corrupt": {"corrupt": ["vision"]},
        "noisy audio": {"corrupt": ["audio"]},
    }
    score = {
        name: evaluate(blind, str(feature_shards), out=tmp_path / f"{name}.json", workers=0, **given)["mean_pearson"]
        for name, given in flags.items()
    }
    assert score["drop"] == score["corrupt"] == score["clean"]
    assert abs(score["noisy audio"] - score["clean"]) > 1e-2


def test_predict_videos_refuses_a_symlink_out_of_the_folder_as_the_builder_does(checkpoint, tmp_path, capsys):
    folder, outside = tmp_path / "videos", tmp_path / "outside.mpg"
    folder.mkdir()
    shutil.copy(CLIPS[0], folder)
    shutil.copy(CLIPS[1], outside)
    os.symlink(outside, folder / "link.mpg")
    common = ["predict", "--checkpoint", str(checkpoint), "--workers", "0", "--out", str(tmp_path / "p.csv")]
    assert main([*common, "--videos", str(folder)]) == 3
    assert read_predictions(tmp_path / "p.csv")[1] == [CLIPS[0].stem]  # no row for the file outside
    assert json.loads((tmp_path / "p.failures.json").read_text())["failures"] == [
        {"file": str(folder / "link.mpg"), "reason": f"escapes the videos folder (a symlink to {outside})"}
    ]
    capsys.readouterr()
    assert main([*common, "--videos", str(folder / CLIPS[0].name)]) == 2
    assert f"--videos {folder / CLIPS[0].name}: a file, not a folder of clips" in capsys.readouterr().err


def test_a_sample_with_a_broken_wav_header_is_named_with_the_reason(checkpoint, clip_shards, tmp_path):
    """One sample's WAV cut to its first 4 bytes: `emi predict --shards` predicts the others, reports the sample,
    and the warning says what is wrong with it."""
    shards = tmp_path / "shards"
    shutil.copytree(clip_shards, shards)
    first = sorted(shards.glob("test-*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar]
    broken = members[0][0].name.split(".")[0]
    with tarfile.open(first, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            data = b"RIFF" if member.name == f"{broken}.wav" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    result = subprocess.run(
        [
            *EMI,
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "p.csv"),
            "--workers",
            "0",
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert (
        f"skipping sample {broken!r}: wav: not a readable WAV (the header ends before its chunks do)" in result.stderr
    ), result.stderr[-3000:]
    assert [failure["key"] for failure in json.loads((tmp_path / "p.failures.json").read_text())["failures"]] == [
        broken
    ]


def test_a_checkpoint_written_in_format_2_loads_with_the_same_weights(checkpoint, tmp_path):
    """Format 2 named the fusion's own weights at the model's top level (quality.*, empty_token, ...); they load
    into the fusion module of format 3."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert any(name.startswith("fusion.") for name in weights)
    save_file(
        {name.removeprefix("fusion."): tensor for name, tensor in weights.items()}, str(old / "model.safetensors")
    )
    record = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**record, "format": "emi-fusion/2"}))
    loaded, _ = load_fusion(old)
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in weights.items())
    (old / "config.json").write_text(json.dumps({**record, "format": "emi-fusion/1"}))
    with pytest.raises(UsageError, match=r"config.json: format 'emi-fusion/1', expected one of \['emi-fusion/2', "):
        load_fusion(old)
