"""emi.synth: file layout, stream formats, determinism, no label leaks, corruption, and learnability.

The learnability checks decode the mp4s back and use generic statistics only (no knowledge of where the face,
mouth or eyes are), fitted by ridge regression on half of the clips and scored on the other half.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from emi import EMI_EMOTIONS
from emi.cli import main
from emi.errors import UsageError
from emi.media import probe as media_probe
from emi.synth import (
    CUE_WORDS,
    EXPRESSION_OF,
    FILLER_WORDS,
    clip_rng,
    draw_labels,
    make_transcript,
    parse_size,
    read_corruption,
    synthesize,
)

NUM_CLIPS = 80
SMALL = 32  # decoded frames are shrunk to SMALL x SMALL for the generic statistics


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def decode_frames(path: Path, size: int) -> np.ndarray:
    """Frames at 5 fps, area-resized to size x size, float in [0, 1], shape (T, size, size, 3)."""
    raw = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(path),
            "-vf",
            f"fps=5,scale={size}:{size}:flags=area",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:",
        ],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3).astype(np.float32) / 255


def decode_audio(path: Path) -> np.ndarray:
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", "16000", "pipe:"],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768


def probe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return json.loads(out)


def label_matrix(rows: list[list[str]]) -> np.ndarray:
    return np.array([[float(v) for v in row[1:]] for row in rows[1:]])


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(b.shape[1])])


def ridge_holdout_pearson(features: np.ndarray, labels: np.ndarray, penalty: float = 10.0) -> np.ndarray:
    """Fit ridge on the first half of the clips, return the per-label Pearson on the second half."""
    half = len(features) // 2
    mean, std = features[:half].mean(0), features[:half].std(0) + 1e-8
    design = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    gram = design[:half].T @ design[:half] + penalty * np.eye(design.shape[1])
    weights = np.linalg.solve(gram, design[:half].T @ labels[:half])
    return pearson_columns(design[half:] @ weights, labels[half:])


def video_temporal_features(frames: np.ndarray) -> np.ndarray:
    """How the picture changes: motion energy, per-pixel temporal spread, colour drift start to end."""
    quarter = max(1, len(frames) // 4)
    motion = np.abs(np.diff(frames, axis=0)).mean(axis=(0, 1, 2))
    spread = frames.std(axis=0).mean(-1)
    drift = frames[-quarter:].mean(axis=(0, 1, 2)) - frames[:quarter].mean(axis=(0, 1, 2))
    return np.concatenate([motion, [spread.mean(), *np.percentile(spread, [90, 99])], drift])


def video_static_features(frame: np.ndarray) -> np.ndarray:
    """What one frame looks like: colour statistics, edges, brightness quantiles."""
    grey = frame.mean(-1)
    edges = [np.abs(np.diff(grey, axis=1)).mean(), np.abs(np.diff(grey, axis=0)).mean()]
    return np.concatenate(
        [
            frame.mean(axis=(0, 1)),
            frame.std(axis=(0, 1)),
            edges,
            np.percentile(grey, [10, 50, 90]),
            [grey[SMALL // 3 : 2 * SMALL // 3].std()],
        ]
    )


def audio_features(audio: np.ndarray) -> np.ndarray:
    """Generic frame-level statistics: energy envelope, its trend and modulation, spectrum, dominant pitch."""
    window = 400
    frames = audio[: len(audio) // window * window].reshape(-1, window)
    energy = frames.std(1)
    log_energy = np.log(energy + 1e-4)
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(window), axis=1))
    freqs = np.fft.rfftfreq(window, 1 / 16000)
    centroid = (spectrum * freqs).sum(1) / (spectrum.sum(1) + 1e-9)
    voice_band = (freqs > 70) & (freqs < 450)
    log_peak = np.log(freqs[voice_band][spectrum[:, voice_band].argmax(1)])
    quarter = max(1, len(frames) // 4)
    modulation = np.abs(np.fft.rfft(energy - energy.mean()))
    modulation_freqs = np.fft.rfftfreq(len(energy), window / 16000)
    fast_modulation = modulation[(modulation_freqs > 6.5) & (modulation_freqs < 13)].sum() / (modulation.sum() + 1e-9)
    crossings = (np.diff(np.sign(frames), axis=1) != 0).mean()
    return np.array(
        [
            log_energy.std(),
            log_energy.mean(),
            log_energy[-quarter:].mean() - log_energy[:quarter].mean(),
            centroid.mean(),
            np.log(crossings),
            log_peak.std(),
            log_peak[-quarter:].mean() - log_peak[:quarter].mean(),
            np.abs(np.diff(log_peak)).mean(),
            fast_modulation,
        ]
    )


def text_features(text: str) -> np.ndarray:
    """Word counts per cue list plus the length of the transcript."""
    words = f" {text} "
    return np.array(
        [sum(words.count(f" {cue} ") for cue in CUE_WORDS[emotion]) for emotion in EMI_EMOTIONS] + [len(text.split())],
        dtype=float,
    )


def spectral_flatness(audio: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(audio[: len(audio) // 512 * 512].reshape(-1, 512), axis=1)) ** 2 + 1e-12
    return float(np.mean(np.exp(np.log(power).mean(1)) / power.mean(1)))


def pixel_roughness(frames: np.ndarray) -> float:
    """Mean absolute difference between horizontally neighbouring pixels."""
    return float(np.abs(np.diff(frames, axis=2)).mean())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synthesize(out=out, clips=NUM_CLIPS, seed=0, workers=2)


@pytest.fixture(scope="module")
def decoded(dataset: tuple[Path, dict]) -> dict[str, list]:
    out, _ = dataset
    paths = [out / "videos" / f"{row[0]}.mp4" for row in read_csv(out / "labels.csv")[1:]]
    with ThreadPoolExecutor(2) as pool:  # the work happens in ffmpeg processes
        return {
            "frames": list(pool.map(lambda path: decode_frames(path, SMALL), paths)),
            "audio": list(pool.map(decode_audio, paths)),
        }


@pytest.fixture(scope="module")
def durations(dataset: tuple[Path, dict]) -> np.ndarray:
    out, _ = dataset
    paths = [out / "videos" / f"{i:05d}.mp4" for i in range(1, NUM_CLIPS + 1)]
    with ThreadPoolExecutor(2) as pool:
        return np.array([float(info["format"]["duration"]) for info in pool.map(probe, paths)])


def test_files_and_csv_layout(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    names = [f"{i:05d}" for i in range(1, NUM_CLIPS + 1)]
    assert sorted(os.listdir(out)) == ["corruption.csv", "labels.csv", "transcripts.csv", "videos"]
    assert sorted(os.listdir(out / "videos")) == [f"{name}.mp4" for name in names]

    labels = read_csv(out / "labels.csv")
    assert labels[0] == ["Filename", *EMI_EMOTIONS]
    assert [row[0] for row in labels[1:]] == names
    for row in labels[1:]:
        assert all(len(value.split(".")[1]) == 4 and 0.0 <= float(value) <= 1.0 for value in row[1:])

    transcripts = read_csv(out / "transcripts.csv")
    assert transcripts[0] == ["Filename", "Text"]
    assert [row[0] for row in transcripts[1:]] == names
    vocabulary = {word for cues in CUE_WORDS.values() for cue in cues for word in cue.split()} | set(FILLER_WORDS)
    assert all(set(row[1].split()) <= vocabulary for row in transcripts[1:])

    assert read_csv(out / "corruption.csv") == [["Filename", "Corrupted"]] + [[name, ""] for name in names]
    assert summary["clips"] == NUM_CLIPS and summary["corrupted_clips"] == 0
    assert summary["empty_transcripts"] == sum(1 for row in transcripts[1:] if not row[1])
    assert summary["labels"] == str(out / "labels.csv") and summary["videos"] == str(out / "videos")
    json.dumps(summary)


def test_streams_are_h264_aac_25fps_16khz_mono_without_metadata(
    dataset: tuple[Path, dict], durations: np.ndarray
) -> None:
    out, summary = dataset
    assert durations.min() >= 2.0 and durations.max() <= 8.0
    assert summary["total_duration_s"] == pytest.approx(durations.sum(), abs=0.1)
    for index in (1, 2, 3):
        info = probe(out / "videos" / f"{index:05d}.mp4")
        video, audio = sorted(info["streams"], key=lambda s: s["codec_type"], reverse=True)
        assert (video["codec_name"], video["width"], video["height"], video["r_frame_rate"]) == (
            "h264",
            128,
            128,
            "25/1",
        )
        assert (audio["codec_name"], audio["sample_rate"], audio["channels"]) == ("aac", "16000", 1)
        assert float(audio["duration"]) == pytest.approx(float(video["duration"]), abs=0.07)
        assert set(info["format"].get("tags", {})) <= {"major_brand", "minor_version", "compatible_brands"}


def test_file_size_depends_on_duration_only(dataset: tuple[Path, dict], durations: np.ndarray) -> None:
    out, _ = dataset
    sizes = np.array([os.path.getsize(out / "videos" / f"{i:05d}.mp4") for i in range(1, NUM_CLIPS + 1)])
    labels = label_matrix(read_csv(out / "labels.csv"))
    # Measured with CBR: relative residual of a linear size ~ duration fit <= 3.2 % (std 0.7 %); the same clips
    # encoded at constant quality (CRF 23) give a residual std of 65 %.
    fit = np.polyval(np.polyfit(durations, sizes, 1), durations)
    assert np.abs(sizes - fit).max() / sizes.min() < 0.05
    # Measured max |r| = 0.16 over the six labels; with 80 clips chance alone gives |r| about 0.11 (1 sd),
    # so 0.35 (3 sd) only trips on a real dependence.
    correlations = pearson_columns(np.repeat((sizes / durations)[:, None], 6, axis=1), labels)
    assert np.abs(correlations).max() < 0.35


def test_durations_do_not_follow_labels(dataset: tuple[Path, dict], durations: np.ndarray) -> None:
    labels = label_matrix(read_csv(dataset[0] / "labels.csv"))
    correlations = pearson_columns(np.repeat(durations[:, None], 6, axis=1), labels)
    assert np.abs(correlations).max() < 0.35  # measured max 0.14; chance sd about 0.11 at 80 clips


def test_label_distribution_is_skewed_and_correlated_but_each_emotion_has_its_own_part() -> None:
    labels = np.array([draw_labels(clip_rng(7, index, "labels")) for index in range(4000)])
    assert labels.min() >= 0.0 and labels.max() <= 1.0
    medians, highs = np.median(labels, axis=0), (labels > 0.7).mean(axis=0)
    assert np.all((medians > 0.1) & (medians < 0.35)), medians  # many low values
    assert np.all((highs > 0.03) & (highs < 0.25)), highs  # some high ones
    correlation = np.corrcoef(labels.T)
    joy, amusement, pain = (EMI_EMOTIONS.index(e) for e in ("Joy", "Amusement", "Empathic Pain"))
    assert correlation[joy, amusement] > 0.3 and correlation[joy, pain] < 0.0
    assert np.abs(correlation - np.eye(6)).max() < 0.6  # nobody is a copy of another emotion


def test_transcript_cue_counts_grow_with_intensity() -> None:
    labels = np.array([draw_labels(clip_rng(3, index, "labels")) for index in range(2000)])
    texts = [make_transcript(row, clip_rng(3, index, "text")) for index, row in enumerate(labels)]
    counts = np.array([text_features(text)[:6] for text in texts])
    spoken = np.array([bool(text) for text in texts])
    assert 0.02 < 1 - spoken.mean() < 0.06  # about 4 % empty transcripts
    correlations = pearson_columns(counts[spoken], labels[spoken])
    # Measured 0.68 to 0.73: informative but noisy, so text alone cannot solve the task.
    assert np.all((correlations > 0.55) & (correlations < 0.85)), correlations


def test_same_seed_gives_identical_clips_for_any_worker_count(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    synthesize(out=tmp_path / "again", clips=4, seed=0, workers=1)
    assert read_csv(tmp_path / "again" / "labels.csv") == read_csv(out / "labels.csv")[:5]
    assert read_csv(tmp_path / "again" / "transcripts.csv") == read_csv(out / "transcripts.csv")[:5]
    for index in range(1, 5):
        first, second = out / "videos" / f"{index:05d}.mp4", tmp_path / "again" / "videos" / f"{index:05d}.mp4"
        np.testing.assert_array_equal(decode_frames(first, 128), decode_frames(second, 128))
        np.testing.assert_array_equal(decode_audio(first), decode_audio(second))
        assert first.read_bytes() == second.read_bytes()

    synthesize(out=tmp_path / "other", clips=4, seed=1, workers=1)
    assert read_csv(tmp_path / "other" / "labels.csv")[1:] != read_csv(out / "labels.csv")[1:5]


def test_temporal_statistics_predict_labels_and_a_single_frame_does_not(
    dataset: tuple[Path, dict], decoded: dict[str, list]
) -> None:
    out, _ = dataset
    labels = label_matrix(read_csv(out / "labels.csv"))
    texts = [row[1] for row in read_csv(out / "transcripts.csv")[1:]]
    pick = np.random.default_rng(0)
    temporal = np.array([video_temporal_features(frames) for frames in decoded["frames"]])
    static = np.array([video_static_features(frames[pick.integers(len(frames))]) for frames in decoded["frames"]])
    audio = np.array([audio_features(samples) for samples in decoded["audio"]])
    text = np.array([text_features(t) for t in texts])

    scores = {
        name: ridge_holdout_pearson(features, labels).mean()
        for name, features in [
            ("temporal", temporal),
            ("static", static),
            ("audio", audio),
            ("text", text),
            ("all", np.hstack([temporal, audio, text])),
        ]
    }
    # Measured (seed 0, 80 clips): temporal video 0.54, static frame 0.01, audio 0.58, text 0.61, all 0.78.
    assert scores["temporal"] > 0.35, scores
    assert scores["audio"] > 0.35, scores
    assert scores["text"] > 0.35, scores
    assert scores["static"] < scores["temporal"] - 0.3, scores
    assert scores["all"] > max(scores["temporal"], scores["audio"], scores["text"]) + 0.05, scores


@pytest.mark.parametrize("modality", ["video", "audio", "text"])
def test_corruption_hits_the_chosen_fraction_and_looks_like_noise(
    dataset: tuple[Path, dict], tmp_path: Path, modality: str
) -> None:
    out, _ = dataset
    clips = 6
    summary = synthesize(out=tmp_path, clips=clips, seed=0, corrupt_modality=modality, corrupt_frac=0.5, workers=2)
    record = read_csv(tmp_path / "corruption.csv")[1:]
    corrupted = [int(name) for name, mark in record if mark]
    assert summary["corrupted_clips"] == len(corrupted) == 3
    assert {mark for _, mark in record} == {"", modality}
    assert read_corruption(tmp_path / "corruption.csv") == (
        {name for name, mark in record if not mark},
        {name for name, mark in record if mark},
    )
    # Labels never change; the corruption replaces one modality and leaves the others as in the clean run.
    assert read_csv(tmp_path / "labels.csv") == read_csv(out / "labels.csv")[: clips + 1]
    clean_texts = read_csv(out / "transcripts.csv")[1 : clips + 1]
    texts = read_csv(tmp_path / "transcripts.csv")[1:]
    for index in range(1, clips + 1):
        clean, noisy = out / "videos" / f"{index:05d}.mp4", tmp_path / "videos" / f"{index:05d}.mp4"
        hit = index in corrupted
        if modality != "text" and not hit:
            assert clean.read_bytes() == noisy.read_bytes()
        if modality == "video":
            np.testing.assert_array_equal(decode_audio(clean), decode_audio(noisy))
            if hit:  # measured 0.15 for noise frames, 0.02 to 0.04 for faces
                assert pixel_roughness(decode_frames(noisy, 128)) > 4 * pixel_roughness(decode_frames(clean, 128))
        if modality == "audio":
            np.testing.assert_array_equal(decode_frames(clean, 64), decode_frames(noisy, 64))
            if hit:
                # Measured flatness: 0.56 for the noise (AAC low-passes it), 0.01 to 0.14 for the voice.
                assert spectral_flatness(decode_audio(noisy)) > 3 * spectral_flatness(decode_audio(clean))
                assert decode_audio(noisy).std() > decode_audio(clean).std()
        if modality == "text":
            assert clean.read_bytes() == noisy.read_bytes()
            assert (texts[index - 1][1] != clean_texts[index - 1][1]) == hit
            if hit:
                assert len(texts[index - 1][1].split()) >= 12


def test_cli_prints_the_summary_and_a_prefix_renames_the_same_clips(
    dataset: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, _ = dataset
    assert main(["synth", "--out", str(tmp_path / "cli"), "--clips", "2", "--seed", "0", "--prefix", "val-"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clips"] == 2 and summary["seed"] == 0
    # the prefix changes the names only: the clips, labels and transcripts are those of the unprefixed data set
    for index in (1, 2):
        assert (tmp_path / "cli" / "videos" / f"val-{index:05d}.mp4").read_bytes() == (
            out / "videos" / f"{index:05d}.mp4"
        ).read_bytes()
    for table in ("labels.csv", "transcripts.csv"):
        assert read_csv(tmp_path / "cli" / table)[1:] == [
            [f"val-{row[0]}", *row[1:]] for row in read_csv(out / table)[1:3]
        ]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"clips": 0}, "--clips"),
        ({"corrupt_frac": 1.5, "corrupt_modality": "video"}, "--corrupt-frac"),
        ({"corrupt_frac": -0.1, "corrupt_modality": "video"}, "--corrupt-frac"),
        ({"corrupt_frac": 0.2}, "needs --corrupt-modality"),
        ({"corrupt_frac": 0.2, "corrupt_modality": "smell"}, "--corrupt-modality"),
        ({"workers": 0}, "--workers"),
        ({"seed": -1}, "--seed"),
        ({"prefix": "val."}, "--prefix"),
        ({"prefix": "a/b"}, "--prefix"),
        ({"size": (641, 360)}, "--size"),
        ({"size": (8, 8)}, "--size"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        synthesize(**{"out": tmp_path / "x", "clips": 2, **arguments})
    assert not (tmp_path / "x").exists()


def test_refuses_a_folder_that_already_holds_files(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(UsageError, match=str(tmp_path)):
        synthesize(out=tmp_path, clips=1)


def test_size_sets_the_clips_width_and_height(tmp_path: Path) -> None:
    summary = synthesize(out=tmp_path / "wide", clips=1, seed=0, size=parse_size("640x360"))
    info = media_probe(tmp_path / "wide" / "videos" / "00001.mp4")
    assert (info.width, info.height) == (640, 360)
    assert summary["size"] == "640x360" and summary["frame_size"] == 360
    with pytest.raises(UsageError, match="--size"):
        parse_size("640 by 360")


def test_expression_va_labels_describe_the_same_clips(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    """The second label kind records Expression, Valence and Arousal of the clips the default kind would write."""
    out, _ = dataset
    summary = synthesize(out=tmp_path / "expr", clips=3, seed=0, labels="expression-va")
    assert summary["label_kind"] == "expression-va"
    for index in (1, 2, 3):
        assert (tmp_path / "expr" / "videos" / f"{index:05d}.mp4").read_bytes() == (
            out / "videos" / f"{index:05d}.mp4"
        ).read_bytes()
    rows = read_csv(tmp_path / "expr" / "labels.csv")
    assert rows[0] == ["Filename", "Expression", "Valence", "Arousal"]
    for row, emi in zip(rows[1:], read_csv(out / "labels.csv")[1:4]):
        y = dict(zip(EMI_EMOTIONS, map(float, emi[1:])))
        strongest = max(EMI_EMOTIONS, key=y.get)
        assert row[0] == emi[0]
        assert row[1] == (EXPRESSION_OF[strongest] if y[strongest] >= 0.3 else "Neutral")
        valence = (y["Joy"] + y["Amusement"] + y["Admiration"]) / 3 - y["Empathic Pain"]
        assert float(row[2]) == pytest.approx(np.clip(valence, -1, 1), abs=1e-4)
        assert -1.0 <= float(row[3]) <= 1.0 and len(row[3].split(".")[1]) == 4


def test_expression_va_clips_pack_into_shards_with_prompts_of_their_kind(tmp_path: Path) -> None:
    from emi.data import ImageSpec
    from emi.formats.manifest import read_manifest
    from emi.prompts import build_prompt

    from helpers import flat_loader, synthetic_split

    shards = synthetic_split(tmp_path, "expr", clips=6, seed=2, frame_size=32, shard_size=4, labels="expression-va")
    assert set(read_manifest(shards).labels) == {"Expression", "Valence", "Arousal"}
    data = flat_loader(str(shards), mode="frame", batch_size=3, prompt_fn=build_prompt, image=ImageSpec(size=16))
    data.set_epoch(0)
    prompts = [prompt for batch in data.dataloader for prompt in batch["prompt"]]
    assert len(prompts) == 6
    kind = r"(Happiness|Surprise|Sadness|Anger|Neutral) \(Intensity: (Low|Moderate|High)\), Valence=-?\d\.\d\d, "
    assert all(re.fullmatch(kind + r"Arousal=-?\d\.\d\d", prompt) for prompt in prompts), prompts


def test_an_unknown_label_kind_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--labels must be one of emi, expression-va"):
        synthesize(out=tmp_path / "x", clips=1, labels="au")
