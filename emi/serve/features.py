"""Stage II inputs: the frozen Stage I encoders run over clip shards, written as feature shards.

    emi features extract --encoders runs/<stage1>/export --shards data/shards/train --out data/features/train
    accelerate launch -m emi.cli features extract ...      # every rank writes its own shards

Each input shard `<name>.tar` becomes a feature shard `<name>.tar` with, per clip:
    <key>.vision.npy  [T, Dv] float16   one row per frame at the shard's fps (5 fps)
    <key>.audio.npy   [T, Da] float16   the audio encoder's 20 ms frames averaged onto the video frame times
    <key>.text.npy    [Dt]    float16   the transcript's sentence feature
    <key>.json        key, labels, has_audio, has_text, num_frames, transcript
npy only (np.save with allow_pickle=False), never pickle. Resumable like the shard builder: a shard is written
under a temporary name and renamed when complete, with a sidecar `<name>.tar.json` (count, bytes, sha256, keys);
a re-run keeps the shards whose sidecar matches and extracts the rest. Once every rank has done its share, rank 0
checks every shard and writes `manifest.json`.
--out may be a URL (s3://...): each feature shard is then written locally and uploaded whole, then its sidecar.

The same `clip_features` turns a decoded clip batch into features for `emi predict`, so training and prediction
share one path from pixels and waveforms to features. Its memory does not grow with a clip's length beyond the
decoded inputs: frames go through the vision encoder VISION_CHUNK at a time (and `emi predict` decodes them chunk
by chunk too: DecodeSpec.lazy_frames), the waveform through the audio encoder in windows of AUDIO_WINDOW_S on the
encoder's own frame grid (`windowed_audio_features`), so attention never spans more than one window. A clip
shorter than one window gets exactly the features of a single pass.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from emi import storage
from emi.data import (
    AudioSpec,
    DataInfo,
    DecodeSpec,
    ImageSpec,
    LoaderSpec,
    Sampling,
    ShardSet,
    Workers,
    build_loader,
    resolve_shards,
)
from emi.data.collect import evaluation_batches
from emi.data.decode import normalise, uniform_indices
from emi.data.modes import pad_stack
from emi.data.urls import shard_name
from emi.devices import process_state, wait_for_ranks
from emi.errors import UsageError
from emi.formats.manifest import FEATURE_SHARDS, Manifest, ShardEntry, read_sidecar, write_manifest, write_sidecar
from emi.io import folder_records, records_digest
from emi.models.encoders import (
    WAV2VEC2_INPUT,
    audio_frame_features,
    audio_frame_grid,
    load_encoders,
    pool_audio_to_frames,
    prepare_waveform,
    text_features,
    vision_features,
)
from emi.shards.files import ShardWriter

VISION_CHUNK = 256  # frames per vision-encoder call
AUDIO_WINDOW_S = 30.0  # seconds of waveform per audio-encoder call (Whisper: its own fixed window)
log = logging.getLogger(__name__)


@dataclass
class FrozenEncoders:
    """The exported Stage I encoders, frozen, with what the data pipeline needs to feed them."""

    path: Path
    vision: torch.nn.Module
    text: torch.nn.Module
    audio: torch.nn.Module
    tokenizer: Any
    image: ImageSpec
    audio_extractor: Any  # the audio encoder's feature extractor: sampling rate, normalisation, log-mel
    device: torch.device

    @property
    def dims(self) -> dict[str, int]:
        return {name: getattr(self, name).config.hidden_size for name in ("vision", "audio", "text")}


def load_frozen_encoders(export_dir: str | Path, device: torch.device | str = "cpu") -> FrozenEncoders:
    loaded = load_encoders(export_dir)
    missing = [name for name in ("vision", "text", "audio") if loaded.get(name) is None]
    if missing:
        raise UsageError(
            f"{export_dir}: Stage II needs vision, text and audio encoders; missing {missing} "
            "(train Stage I with both pairs)"
        )
    info = loaded["image_processing"]
    device = torch.device(device)
    return FrozenEncoders(
        path=Path(export_dir).resolve(),
        vision=loaded["vision"].to(device),
        text=loaded["text"].to(device),
        audio=loaded["audio"].to(device),
        tokenizer=loaded["tokenizer"],
        image=ImageSpec(info["image_size"], tuple(info["image_mean"]), tuple(info["image_std"])),
        audio_extractor=loaded["audio_extractor"],
        device=device,
    )


def windowed_audio_features(
    encoder: torch.nn.Module,
    audio: torch.Tensor,
    mask: torch.Tensor,
    extractor: Any = WAV2VEC2_INPUT,
    window_s: float = AUDIO_WINDOW_S,
) -> tuple[torch.Tensor, torch.Tensor]:
    """audio_frame_features of waveforms [B, S] (valid where mask [B, S]), run over windows of about `window_s`
    (Whisper: its fixed window): each window starts on the encoder's frame grid and reaches one receptive field
    past its last frame, so the windows' frames are exactly the frames of one pass over the whole waveform (20 ms
    apart), each computed once; attention spans one window. The waveforms are prepared whole first (normalised
    over the whole clip where the extractor normalises), as one pass would."""
    field, stride, max_frames = audio_frame_grid(encoder, extractor)
    frames_per_window = max_frames or max(1, round(window_s * extractor.sampling_rate / stride))
    step = frames_per_window * stride
    audio = prepare_waveform(audio, mask, extractor)
    if audio.shape[1] <= step + field - stride:  # one window: one pass
        return audio_frame_features(encoder, audio, mask.long(), extractor, prepare=False)
    states, masks = [], []
    for start in range(0, audio.shape[1] - field + 1, step):
        end = start + step + field - stride
        window_states, window_mask = audio_frame_features(
            encoder, audio[:, start:end], mask[:, start:end].long(), extractor, prepare=False
        )
        states.append(window_states)
        masks.append(window_mask)
    return torch.cat(states, dim=1), torch.cat(masks, dim=1)


@torch.no_grad()
def clip_features(encoders: FrozenEncoders, batch: dict[str, Any], fps: float) -> list[dict[str, Any]]:
    """Features of every clip of a `clip`-mode batch (all frames, whole audio): a list of per-clip dicts."""
    device = encoders.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if isinstance(batch["frames"], list):  # ClipFrames (lazy_frames): decoded chunk by chunk as well
            per_clip_vision = [
                torch.cat(
                    [
                        vision_features(encoders.vision, normalise(chunk.to(device), encoders.image))
                        for chunk in frames.chunks(VISION_CHUNK)
                    ]
                ).float()
                for frames in batch["frames"]
            ]
        else:
            frames, frame_mask = batch["frames"].to(device), batch["frame_mask"].to(device)
            valid_frames = normalise(frames[frame_mask], encoders.image)  # uint8 from the loader
            vision = torch.cat(
                [vision_features(encoders.vision, chunk) for chunk in valid_frames.split(VISION_CHUNK)]
            ).float()
            per_clip_vision = vision.split(frame_mask.sum(1).tolist())

        audio_states, audio_frame_mask = windowed_audio_features(
            encoders.audio, batch["audio"].to(device), batch["audio_mask"].to(device), encoders.audio_extractor
        )
        text = text_features(encoders.text, batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()

    sample_rate = encoders.audio_extractor.sampling_rate
    audio_frame_s = audio_frame_grid(encoders.audio, encoders.audio_extractor)[1] / sample_rate  # 20 ms
    clips = []
    for i, key in enumerate(batch["key"]):
        num_frames = len(per_clip_vision[i])
        audio = pool_audio_to_frames(
            audio_states[i].float(), audio_frame_mask[i], num_frames, video_fps=fps, audio_frame_s=audio_frame_s
        )
        has_audio = bool(batch["has_audio"][i]) and bool(audio_frame_mask[i].any())
        has_text = bool(batch["transcript"][i].strip())
        clips.append(
            {
                "key": key,
                "num_frames": num_frames,
                "has_audio": has_audio,
                "has_text": has_text,
                "transcript": batch["transcript"][i],
                "vision": per_clip_vision[i].cpu().numpy(),
                "audio": audio.cpu().numpy() if has_audio else np.zeros_like(audio.cpu().numpy()),
                "text": text[i].cpu().numpy() if has_text else np.zeros_like(text[i].cpu().numpy()),
            }
        )
    return clips


def fusion_batch(clips: list[dict[str, Any]], num_frames: int) -> dict[str, torch.Tensor]:
    """Per-clip features (from `clip_features`) as a Stage II batch laid out as the `features` loader lays
    feature shards out: frames sampled uniformly to `num_frames` (0: all), padded, with masks and flags."""
    batch: dict[str, Any] = {"key": [clip["key"] for clip in clips]}
    for name in ("vision", "audio"):
        arrays = [torch.from_numpy(clip[name].astype(np.float16)).float() for clip in clips]  # as stored
        arrays = [a[uniform_indices(len(a), num_frames)] for a in arrays]
        batch[name], batch[f"{name}_mask"] = pad_stack(arrays, num_frames)
    batch["text"] = torch.stack([torch.from_numpy(clip["text"].astype(np.float16)).float() for clip in clips])
    batch["has_audio"] = torch.tensor([clip["has_audio"] for clip in clips])
    batch["has_text"] = torch.tensor([clip["has_text"] for clip in clips])
    return batch


def clip_decoding(encoders: FrozenEncoders, label_names: list[str], lazy_frames: bool = False) -> DecodeSpec:
    """How clips are decoded for the encoders, in extraction, evaluation and prediction alike: every frame, the
    whole audio at the audio encoder's rate, eval views, transcripts tokenised for the text encoder. `lazy_frames`:
    frames decoded chunk by chunk (emi predict: a video of any length)."""
    audio = AudioSpec(sample_rate=encoders.audio_extractor.sampling_rate, seconds=0.0)
    return DecodeSpec(
        "clip",
        image=encoders.image,
        audio=audio,
        num_frames=0,
        label_names=tuple(label_names),
        tokenizer=encoders.tokenizer,
        max_text_len=min(encoders.tokenizer.model_max_length, 512),
        lazy_frames=lazy_frames,
    )


def clip_loader(
    shards: str | ShardSet,
    encoders: FrozenEncoders,
    label_names: list[str],
    batch_size: int,
    num_workers: int,
    world_size: int = 1,
    rank: int = 0,
) -> DataInfo:
    """An unshuffled `clip` loader for one rank (the last batch wraps around: emi.data.collect)."""
    return build_loader(
        shards,
        LoaderSpec(
            clip_decoding(encoders, label_names),
            Sampling(batch_size, world_size, rank),
            Workers(num_workers, persistent_workers=False),
        ),
    )


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def feature_members(clip: dict[str, Any], labels: dict[str, float]) -> list[tuple[str, bytes]]:
    key = clip["key"]
    meta = {
        "key": key,
        "labels": labels,
        "has_audio": clip["has_audio"],
        "has_text": clip["has_text"],
        "num_frames": clip["num_frames"],
        "transcript": clip["transcript"],
    }
    return [
        (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()),
        (f"{key}.vision.npy", npy_bytes(clip["vision"])),
        (f"{key}.audio.npy", npy_bytes(clip["audio"])),
        (f"{key}.text.npy", npy_bytes(clip["text"])),
    ]


def _complete(out: str | Path, name: str) -> ShardEntry | None:
    """The entry of a finished feature shard (its sidecar, checked against it), None when the shard must be
    (re)extracted."""
    shard = storage.join(out, name)
    entry = read_sidecar(shard)
    if entry is None or storage.size(shard) != entry.bytes:
        return None
    return entry if entry.sha256 == storage.sha256(shard) else None


def _extract(
    state: PartialState,
    frozen: FrozenEncoders,
    shard_set: ShardSet,
    source: Manifest,
    out: str | Path,
    staging: Path,
    fps: float,
    label_names: list[str],
    batch_size: int,
    num_workers: int,
) -> int:
    """This rank's share of the shards (every n-th) not yet complete in `out`, extracted; returns how many. A shard
    is written under a temporary name and renamed into place (a local `out`), or written in `staging` and
    uploaded whole (a URL), then its sidecar is written."""
    extracted = 0
    for index, info in enumerate(shard_set.shards):
        name = shard_name(info.url)
        if index % state.num_processes != state.process_index or _complete(out, name) is not None:
            continue
        writer = ShardWriter((staging if storage.is_url(out) else out) / name)
        one_shard = ShardSet(info.url, [info], [source], [])
        data = clip_loader(one_shard, frozen, label_names, batch_size, num_workers)
        for batch, fresh in evaluation_batches(data, frozen.device):
            for i, clip in enumerate(clip_features(frozen, batch, fps)):
                if not fresh[i]:
                    continue
                labels = {
                    n: float(v)
                    for n, v, ok in zip(label_names, batch["labels"][i].tolist(), batch["label_mask"][i].tolist())
                    if ok
                }
                writer.add(clip["key"], feature_members(clip, labels))
        entry = writer.finish()
        if storage.is_url(out):
            storage.upload(writer.path, storage.join(out, name))
            writer.path.unlink()
        write_sidecar(storage.join(out, name), entry)
        extracted += 1
        log.info("rank %d: %s -> %d clips", state.process_index, name, entry.num_samples)
    return extracted


def extract_features(
    encoders: str | Path,
    shards: str,
    out: str | Path,
    batch_size: int = 8,
    num_workers: int = 1,
    manifest: str | Path | None = None,
) -> dict:
    """Extract features of every clip in `shards` into `out`; on several ranks each takes every n-th shard.

    The shards' manifest (beside them, or `manifest` for `pipe:` and remote URLs) says how the clips were prepared
    and which labels they carry; shards no manifest describes are refused rather than guessed at."""
    state = process_state()
    out = str(out) if storage.is_url(str(out)) else Path(out)
    shard_set = resolve_shards(shards, manifest)
    source = shard_set.manifest("emi features extract")
    if source.is_features:
        raise UsageError(f"--shards {shards}: these are feature shards ({source.path}); extract from clip shards")
    if state.is_main_process and not storage.is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    frozen = load_frozen_encoders(encoders, state.device)
    # what Stage II checks before it copies these encoders into its checkpoints
    encoders_sha256 = records_digest(folder_records(frozen.path)) if state.is_main_process else None
    fps, label_names = source.preprocessing.fps, source.float_labels
    with tempfile.TemporaryDirectory(prefix="emi-features-") as tmp:  # where a shard for a URL waits until complete
        extracted = _extract(
            state, frozen, shard_set, source, out, Path(tmp), fps, label_names, batch_size, num_workers
        )
    wait_for_ranks(state, f"extracted {extracted} shard(s)")  # rank 0 checks every rank's shards next
    written = None
    if state.is_main_process:
        entries = []
        for info in shard_set.shards:
            entry = _complete(out, shard_name(info.url))
            if entry is None:
                raise RuntimeError(f"{storage.join(out, shard_name(info.url))}: missing or damaged after extraction")
            entries.append(entry)
        written = Manifest(
            format=FEATURE_SHARDS,
            split=source.split,
            shards=entries,
            labels={name: "float" for name in label_names},
            preprocessing=source.preprocessing,
            dims=frozen.dims,
            encoders=str(frozen.path),
            encoders_sha256=encoders_sha256,
            source=storage.shown(shards),
        )
        write_manifest(out, written)
    state.wait_for_everyone()
    return {
        "out": storage.shown(out),
        "shards": len(shard_set.shards),
        "extracted_here": extracted,
        "num_samples": written.num_samples if written is not None else None,
    }
