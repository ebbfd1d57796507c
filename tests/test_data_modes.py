"""What each mode yields: shapes, dtypes, masks, label order, normalisation, frame choice, audio."""

from __future__ import annotations

import io
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from emi import EMI_EMOTIONS
from emi.data import AudioSpec, ImageSpec
from emi.data.decode import (
    CLIP_MEAN,
    CLIP_STD,
    FrameView,
    SampleError,
    decode_wav,
    load_frame,
    normalise,
    open_jpeg,
    sample_rng,
)
from emi.data.modes import DecodeSpec, decode_sample
from emi.data.reader import RawSample

from helpers import FPS, flat_loader, grey_level, jpeg_bytes, write_shards

SIZE = 32


def label_prompt(labels: dict) -> str:
    return f"joy {labels['Joy']}"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modes")
    write_shards(root / "grey", [3, 3], pattern="grey", frames=(2, 9))
    write_shards(root / "low_rate", [2], sample_rate=8000)
    return {"grey": root / "grey", "low_rate": root / "low_rate"}


def json_of(folder: Path) -> dict[str, dict]:
    """key -> the sample's json, read straight from the tars."""
    metas = {}
    for tar in sorted(folder.glob("*.tar")):
        for sample in webdataset.WebDataset(str(tar), shardshuffle=False):
            metas[sample["__key__"]] = json.loads(sample["json"])
    return metas


def one_epoch(folder: Path, **kwargs) -> list[dict]:
    settings = dict(
        batch_size=3,
        num_workers=0,
        world_size=1,
        rank=0,
        seed=0,
        shuffle=False,
        train=False,
        image=ImageSpec(size=SIZE),
    )
    data = flat_loader(str(folder), **{**settings, **kwargs})
    data.set_epoch(0)
    return list(data.dataloader)


def levels(frames: torch.Tensor) -> torch.Tensor:
    """The grey level of constant uint8 frames [..., 3, H, W]."""
    assert frames.dtype == torch.uint8  # normalised on the device, by the consumer
    return frames.float().mean(dim=(-3, -2, -1))


def test_clip_mode_shapes_masks_labels_and_uniform_frames(dirs):
    metas = json_of(dirs["grey"])
    batches = one_epoch(
        dirs["grey"],
        mode="clip",
        num_frames=4,
        audio=AudioSpec(seconds=0.5),
        label_names=["Joy", "Admiration", "Gratitude"],
    )
    assert len(batches) == 2
    batch = batches[0]
    assert batch["frames"].shape == (3, 4, 3, SIZE, SIZE) and batch["frames"].dtype == torch.uint8
    assert batch["frame_mask"].dtype == torch.bool and batch["audio"].shape == (3, 8000)
    assert batch["audio_mask"].all() and batch["has_audio"].tolist() == [True] * 3
    assert batch["key"] == ["s0-000", "s0-001", "s0-002"] and batch["num_skipped"] == 0
    for row, key in enumerate(batch["key"]):
        meta = metas[key]
        labels = batch["labels"][row]
        assert labels[:2].tolist() == pytest.approx([meta["labels"]["Joy"], meta["labels"]["Admiration"]])
        assert math.isnan(labels[2]) and batch["label_mask"][row].tolist() == [True, True, False]
        assert batch["transcript"][row] == meta["transcript"]
        count = meta["num_frames"]
        shown = (
            [grey_level(i) for i in np.round(np.linspace(0, count - 1, 4)).astype(int)]
            if count > 4
            else [grey_level(i) for i in range(count)]
        )
        assert batch["frame_mask"][row].tolist() == [True] * len(shown) + [False] * (4 - len(shown))
        assert levels(batch["frames"][row, : len(shown)]).tolist() == pytest.approx(shown, abs=1.0)
        assert (batch["frames"][row, len(shown) :] == 0).all()


def test_clip_mode_num_frames_zero_and_whole_audio_pad_to_the_longest(dirs):
    metas = json_of(dirs["grey"])
    for batch in one_epoch(dirs["grey"], mode="clip", num_frames=0, audio=AudioSpec(seconds=0)):
        counts = [metas[key]["num_frames"] for key in batch["key"]]
        assert batch["frames"].shape[1] == max(counts)
        assert batch["frame_mask"].sum(1).tolist() == counts
        lengths = [n * 16000 // FPS for n in counts]
        assert batch["audio"].shape[1] == max(lengths) and batch["audio_mask"].sum(1).tolist() == lengths


def test_eval_audio_window_is_the_centre_of_the_clip(dirs):
    batch = one_epoch(dirs["grey"], mode="audio", prompt_fn=label_prompt, audio=AudioSpec(seconds=0.25))[0]
    tar = dirs["grey"] / "train-000000.tar"
    sample = next(iter(webdataset.WebDataset(str(tar), shardshuffle=False)))
    waveform, _ = decode_wav(sample["wav"])
    start = (len(waveform) - 4000) // 2
    assert torch.equal(batch["input_values"][0], waveform[start : start + 4000])
    assert batch["audio_attention_mask"].shape == (3, 4000) and batch["audio_attention_mask"].all()


def test_8khz_audio_is_resampled_to_16khz(dirs):
    metas = json_of(dirs["low_rate"])
    batch = one_epoch(dirs["low_rate"], mode="clip", batch_size=2, num_frames=2, audio=AudioSpec(seconds=0))[0]
    lengths = [metas[key]["num_frames"] * 8000 // FPS * 2 for key in batch["key"]]
    assert batch["audio_mask"].sum(1).tolist() == lengths
    # A 200+ Hz tone keeps its energy through resampling: RMS close to 0.3 / sqrt(2).
    rms = batch["audio"][0, : lengths[0]].pow(2).mean().sqrt()
    assert float(rms) == pytest.approx(0.3 / math.sqrt(2), rel=0.05)


def test_frame_mode_takes_the_middle_frame_in_eval_and_builds_prompts(dirs):
    metas = json_of(dirs["grey"])
    for batch in one_epoch(dirs["grey"], mode="frame", prompt_fn=label_prompt):
        assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
        assert batch["prompt"] == [label_prompt(metas[key]["labels"]) for key in batch["key"]]
        middle = [grey_level(metas[key]["num_frames"] // 2) for key in batch["key"]]
        assert levels(batch["pixel_values"]).tolist() == pytest.approx(middle, abs=1.0)
        assert "frames" not in batch and "input_values" not in batch


def test_frame_audio_mode_with_a_tokenizer(dirs):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "joy": 2}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]")
    batch = one_epoch(
        dirs["grey"],
        mode="frame_audio",
        prompt_fn=label_prompt,
        tokenizer=tokenizer,
        max_text_len=6,
        audio=AudioSpec(seconds=0.3),
    )[0]
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["input_values"].shape == (3, 4800)
    # "joy 0.123" -> joy, 0, ., 123 under whitespace-and-punctuation splitting; padded to 6.
    assert batch["input_ids"].shape == (3, 6) and batch["input_ids"][:, 0].tolist() == [2, 2, 2]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0]] * 3


def grey_sample(level: int, size: tuple[int, int] = (80, 60)) -> RawSample:
    pixels = np.full((size[1], size[0], 3), level, dtype=np.uint8)
    meta = {"labels": {"Joy": 0.5}, "has_audio": False}
    return RawSample("k", "mem.tar", {"0000.jpg": jpeg_bytes(pixels), "json": json.dumps(meta).encode()})


def spec(**kwargs) -> DecodeSpec:
    values = dict(
        mode="frame",
        train=False,
        image=ImageSpec(),
        audio=AudioSpec(),
        num_frames=4,
        label_names=EMI_EMOTIONS,
        prompt_fn=label_prompt,
        tokenizer=None,
        max_text_len=8,
    )
    return DecodeSpec(**{**values, **kwargs})


def test_a_constant_grey_frame_normalises_to_the_expected_value():
    sample = decode_sample(grey_sample(128), spec(), sample_rng(0, 0, "k"))
    assert sample["pixel_values"].shape == (3, 224, 224) and sample["pixel_values"].dtype == torch.uint8
    pixels = normalise(sample["pixel_values"], ImageSpec())
    expected = [(128 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert pixels.dtype == torch.float32 and pixels.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-3)
    assert pixels.std(dim=(1, 2)).max() < 1e-3
    assert sample["has_audio"] is False and sample["prompt"] == "joy 0.5"


def test_train_views_are_seeded_by_epoch_and_key():
    y, x = np.mgrid[0:64, 0:96]
    gradient = np.repeat(((x * 2 + y * y // 8) % 256).astype(np.uint8)[..., None], 3, axis=-1)
    raw = RawSample("k", "mem.tar", {"0000.jpg": jpeg_bytes(gradient), "json": b'{"labels": {"Joy": 1}}'})
    train = spec(train=True, image=ImageSpec(size=32))
    views = [decode_sample(raw, train, sample_rng(0, epoch, "k"))["pixel_values"] for epoch in range(4)]
    assert torch.equal(views[1], decode_sample(raw, train, sample_rng(0, 1, "k"))["pixel_values"])
    assert len({v.numpy().tobytes() for v in views}) == 4
    evals = [
        decode_sample(raw, spec(image=ImageSpec(size=32)), sample_rng(0, e, "k"))["pixel_values"] for e in range(2)
    ]
    assert torch.equal(evals[0], evals[1])


def test_train_audio_augmentation_changes_gain_and_adds_noise():
    t = np.arange(16000) / 16000
    pcm = io.BytesIO()
    with wave.open(pcm, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes((0.25 * np.sin(2 * math.pi * 300 * t) * 32767).astype("<i2").tobytes())
    raw = RawSample("k", "mem.tar", {"wav": pcm.getvalue(), "json": b'{"labels": {"Joy": 1}}'})
    audio = AudioSpec(seconds=0.5, gain_db=(6.0, 6.0), snr_db=(20.0, 20.0))
    clean = decode_sample(raw, spec(mode="audio", audio=AudioSpec(seconds=0.5)), sample_rng(0, 0, "k"))["audio"]
    noisy = decode_sample(raw, spec(mode="audio", audio=audio, train=True), sample_rng(0, 0, "k"))["audio"]
    assert len(clean) == len(noisy) == 8000
    power = float(clean.pow(2).mean()) * 10 ** (6 / 10)
    assert float(noisy.pow(2).mean()) == pytest.approx(power * (1 + 10 ** (-20 / 10)), rel=0.05)


def test_corrupt_entries_raise_sample_errors_with_the_reason():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = jpeg_bytes(noise)
    bad = {"0000.jpg": whole[: len(whole) // 2], "json": grey_sample(100).entries["json"]}
    with pytest.raises(SampleError, match="0000.jpg: corrupt JPEG"):
        decode_sample(RawSample("k", "x.tar", bad), spec(), sample_rng(0, 0, "k"))
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with pytest.raises(SampleError, match="a PNG image, expected JPEG"):
        decode_sample(RawSample("k", "x.tar", {**bad, "0000.jpg": png.getvalue()}), spec(), sample_rng(0, 0, "k"))
    with pytest.raises(SampleError, match="no .wav entry"):
        decode_sample(grey_sample(100), spec(mode="audio"), sample_rng(0, 0, "k"))
    with pytest.raises(SampleError, match="label 'Joy' is 'high', not a number"):
        raw = grey_sample(100)
        raw.entries["json"] = b'{"labels": {"Joy": "high"}}'
        decode_sample(raw, spec(), sample_rng(0, 0, "k"))


def test_features_mode_pads_arrays_and_refuses_object_arrays(tmp_path):
    def npy(array: np.ndarray) -> bytes:
        out = io.BytesIO()
        np.save(out, array, allow_pickle=True)
        return out.getvalue()

    with webdataset.TarWriter(str(tmp_path / "feat-000000.tar"), encoder=False) as writer:
        for i, steps in enumerate([3, 6, 2]):
            writer.write(
                {
                    "__key__": f"f{i}",
                    "json": json.dumps({"labels": {"Joy": i / 10}}).encode(),
                    "vision.npy": npy(np.full((steps, 4), i, np.float16)),
                    "audio.npy": npy(np.ones((steps * 2, 5), np.float32)),
                    "text.npy": npy(np.arange(3, dtype=np.float64) + i),
                }
            )
        writer.write(
            {
                "__key__": "evil",
                "json": b'{"labels": {}}',
                "vision.npy": npy(np.array([{"a": 1}], dtype=object)),
                "audio.npy": npy(np.ones((2, 5))),
                "text.npy": npy(np.ones(3)),
            }
        )
    batches = one_epoch(tmp_path / "feat-000000.tar", mode="features", num_frames=0)
    batch = batches[0]
    assert batch["vision"].shape == (3, 6, 4) and batch["vision"].dtype == torch.float32
    assert batch["vision_mask"].sum(1).tolist() == [3, 6, 2] and batch["vision"][2, :2].eq(2).all()
    assert batch["audio"].shape == (3, 12, 5) and batch["audio_mask"].sum(1).tolist() == [6, 12, 4]
    assert batch["text"].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    # The object array is refused (never unpickled); the wrap (f0, f1) and a fill-up (f0) follow.
    assert batches[1]["key"] == ["f0", "f1", "f0"] and batches[1]["num_skipped"] == 1
    fixed = one_epoch(tmp_path / "feat-000000.tar", mode="features", num_frames=4)[0]
    assert fixed["vision"].shape == (3, 4, 4) and fixed["vision_mask"].sum(1).tolist() == [3, 4, 2]


def test_large_frames_are_draft_decoded_to_the_same_view():
    y, x = np.mgrid[0:720, 0:960]
    pixels = np.stack([(x // 4) % 256, (y // 3) % 256, ((x + y) // 8) % 256], axis=-1).astype(np.uint8)
    data = jpeg_bytes(pixels)
    view = FrameView((0.3, 0.1, 0.8, 0.9), flip=False)  # a 480 x 576 box: draft decodes at 1/4
    drafted = load_frame(open_jpeg(data, "0000.jpg"), "0000.jpg", view, 64)
    full = (
        Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC, box=(288, 72, 768, 648))
    )
    assert drafted.shape == (3, 64, 64)
    assert (drafted.float() - torch.from_numpy(np.array(full)).permute(2, 0, 1).float()).abs().mean() < 1


def test_labels_the_prompt_needs_missing_is_a_sample_error():
    raw = grey_sample(100)
    raw.entries["json"] = b'{"labels": {"Amusement": 0.2}}'
    with pytest.raises(SampleError, match="json: no prompt from its labels \\(KeyError: 'Joy'\\)"):
        decode_sample(raw, spec(), sample_rng(0, 0, "k"))
