"""Loader throughput against two baselines doing the same work, in `clip` mode (Stage II features, predict: T=16
frames at 224 px, whole audio) and `frame` mode (Stage I: one frame at 224 px and the prompt of the labels).

1. A minimal ceiling, clip mode: one process doing the same work with nothing around it: read the tars with
   `tarfile`, pick the same 16 frames (round(linspace)), decode them with PIL, resize the short side to 224 (bicubic)
   and centre-crop (one PIL resize of the centre square), read the wav with `wave`, and stack batches of 8.
   Target: the loader with 1 worker >= 0.8 of the ceiling, and 2 workers faster than 1.
2. webdataset's own pipeline (DataPipeline: shard list, split_by_worker, tarfile_to_samples, map, batched; WebLoader
   with 2 workers), decoding only the frames the sample uses, in each mode. Target: the loader with 2 workers
   >= 1.0x webdataset with 2 workers, in both modes.

Every reader yields the same batches: frames as uint8 (the loader normalises on the device), labels as float
tensors, transcripts or prompts as strings, eval views (the centre square; the middle frame in frame mode).

    python -m benchmarks.bench_loader [SHARD_DIR]    (no folder: writes 200 synthetic clips to a temp dir)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch
import webdataset
from PIL import Image

from benchmarks.timing import Meter, table, verdict
from emi import EMI_EMOTIONS
from emi.data import AudioSpec, DecodeSpec, ImageSpec, LoaderSpec, Sampling, Workers, build_loader
from emi.prompts import build_prompt
from emi.shards.files import ShardWriter

NUM_FRAMES, IMAGE_SIZE = 16, 224
BATCH_SIZE = {"clip": 8, "frame": 32}
TARGET_1_WORKER = 0.8  # loader with 1 worker over the ceiling; and 2 workers faster than 1
TARGET_WEBDATASET = 1.0  # loader over webdataset's pipeline, 2 workers each, in both modes


def write_synthetic_shards(out: Path, num_clips: int = 200, shard_size: int = 50, seed: int = 0) -> Path:
    """Clips of 15-40 frames at 455x256 (16:9, 256 short side, JPEG quality 90) with 16 kHz audio."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # A textured scene (a smooth pattern plus noise, so JPEGs are as large as real frames) that each
    # frame shows through a moving 455 px window.
    y, x = np.mgrid[0:256, 0 : 455 + 128]
    scene = 128 + 60 * np.sin(x / 23.0) * np.cos(y / 17.0) + rng.normal(0, 8, x.shape)
    scene = np.clip(scene[..., None] + [0, 20, -20], 0, 255).astype(np.uint8)
    shards = []
    for start in range(0, num_clips, shard_size):
        name = f"train-{start // shard_size:06d}.tar"
        keys = [f"{i:05d}" for i in range(start, min(start + shard_size, num_clips))]
        writer = ShardWriter(out / name)  # the shard builder's writer: the same tar layout as real shards
        for key in keys:
            num_frames = int(rng.integers(15, 41))
            first = int(rng.integers(128))
            frames = []
            for frame in range(num_frames):
                offset = (first + 3 * frame) % 128
                buffer = io.BytesIO()
                Image.fromarray(scene[:, offset : offset + 455]).save(buffer, "JPEG", quality=90)
                frames.append((f"{key}.{frame:04d}.jpg", buffer.getvalue()))
            pcm = (rng.normal(0, 0.1, num_frames * 16000 // 5) * 32767).astype("<i2")
            buffer = io.BytesIO()
            with wave.open(buffer, "wb") as wav:
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(16000)
                wav.writeframes(pcm.tobytes())
            meta = {
                "key": key,
                "fps": 5,
                "num_frames": num_frames,
                "sample_rate": 16000,
                "has_audio": True,
                "labels": {"Joy": 0.5},
            }
            writer.add(
                key,
                [
                    (f"{key}.json", json.dumps(meta).encode()),
                    (f"{key}.txt", b"a transcript"),
                    (f"{key}.wav", buffer.getvalue()),
                    *frames,
                ],
            )
        writer.finish()
        shards.append({"name": name, "num_samples": len(keys)})
    (out / "manifest.json").write_text(
        json.dumps({"format": "emi-shards/1", "split": "train", "shards": shards, "num_samples": num_clips})
    )
    return out


def _centre_frame(data: bytes) -> torch.Tensor:
    """A JPEG's centre square resized (bicubic) to IMAGE_SIZE, uint8 [3, H, W]."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    side = min(image.size)  # resize short side + centre crop, as one resize of the centre square
    left, top = round((image.width - side) / 2), round((image.height - side) / 2)  # whole pixels, as torchvision
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _waveform(data: bytes) -> torch.Tensor:
    with wave.open(io.BytesIO(data)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)


def _frame_names(entries: dict) -> list[str]:
    return sorted(name for name in entries if name.endswith(".jpg"))


def _labels(meta: dict) -> torch.Tensor:
    return torch.tensor([float(meta["labels"].get(name, "nan")) for name in EMI_EMOTIONS])


def clip_sample(entries: dict) -> dict:
    """Clip mode on one sample's entries (by extension): 16 frames spread evenly, the wav, labels, transcript."""
    frames = _frame_names(entries)
    chosen = (
        np.round(np.linspace(0, len(frames) - 1, NUM_FRAMES)).astype(int)
        if len(frames) > NUM_FRAMES
        else range(len(frames))
    )
    meta = json.loads(entries["json"])
    return {
        "frames": torch.stack([_centre_frame(entries[frames[i]]) for i in chosen]),
        "audio": _waveform(entries["wav"]),
        "labels": _labels(meta),
        "transcript": entries["txt"].decode(),
    }


def frame_sample(entries: dict) -> dict:
    """Frame mode on one sample's entries: the middle frame, labels and the prompt built from them."""
    frames = _frame_names(entries)
    meta = json.loads(entries["json"])
    return {
        "pixel_values": _centre_frame(entries[frames[len(frames) // 2]]),
        "labels": _labels(meta),
        "prompt": build_prompt(meta["labels"]),
    }


def collate(samples: list[dict]) -> dict:
    """Stack, zero-padding frames to NUM_FRAMES and audio to the longest."""
    batch = {"labels": torch.stack([s["labels"] for s in samples])}
    if "frames" in samples[0]:
        frames = torch.zeros(len(samples), NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        audio = torch.zeros(len(samples), max(len(s["audio"]) for s in samples))
        for row, sample in enumerate(samples):
            frames[row, : len(sample["frames"])] = sample["frames"]
            audio[row, : len(sample["audio"])] = sample["audio"]
        batch.update(frames=frames, audio=audio, transcript=[s["transcript"] for s in samples])
    else:
        batch.update(
            pixel_values=torch.stack([s["pixel_values"] for s in samples]), prompt=[s["prompt"] for s in samples]
        )
    return batch


def measure(read_epoch) -> dict:
    """samples/s (wall clock) and CPU ms per sample of one call of read_epoch() -> number of samples."""
    with Meter() as meter:
        count = read_epoch()
    return {"samples_per_s": count / meter.wall, "cpu_ms_per_sample": 1000 * meter.cpu / count}


def ceiling_epoch(shard_dir: Path) -> int:
    """The minimal single-process reader in clip mode; returns the number of samples read."""
    count, batch = 0, []
    for path in sorted(shard_dir.glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for entries in samples.values():
            batch.append(clip_sample(entries))
            count += 1
            if len(batch) == BATCH_SIZE["clip"]:
                collate(batch)
                batch = []
    return count


def webdataset_epoch(shard_dir: Path, mode: str, num_workers: int) -> int:
    """One epoch of webdataset's pipeline, each worker its share of the shards; returns the number of samples."""
    urls = [str(path) for path in sorted(shard_dir.glob("*.tar"))]
    to_sample = clip_sample if mode == "clip" else frame_sample
    pipeline = webdataset.DataPipeline(
        webdataset.SimpleShardList(urls),
        webdataset.split_by_worker,
        webdataset.tarfile_to_samples(),
        webdataset.map(to_sample),
        webdataset.batched(BATCH_SIZE[mode], collation_fn=collate, partial=True),
    )
    loader = webdataset.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
    return sum(len(batch["labels"]) for batch in loader)


def loader_epoch(shard_dir: Path | str, num_workers: int, mode: str = "clip") -> int:
    """One epoch of `build_loader` (eval, unshuffled: the same work as the baselines), workers started and
    joined inside it (so their CPU time is counted); returns the number of samples."""
    decode = DecodeSpec(
        mode,
        num_frames=NUM_FRAMES,
        image=ImageSpec(size=IMAGE_SIZE),
        audio=AudioSpec(seconds=0),
        prompt_fn=build_prompt,
    )
    data = build_loader(
        str(shard_dir),
        LoaderSpec(
            decode, Sampling(BATCH_SIZE[mode]), Workers(num_workers, pin_memory=False, persistent_workers=False)
        ),
    )
    data.set_epoch(0)
    return sum(len(batch["key"]) for batch in data.dataloader)


def run(shard_dir: str | Path, repeats: int = 3) -> dict:
    """Best of `repeats` interleaved rounds of each measurement (the best is the least disturbed by
    other processes on the machine). CPU ms per sample (all processes) shows the pipeline's overhead
    even on a busy machine, where wall-clock rates and scaling are unreliable."""
    shard_dir = Path(shard_dir)
    for path in shard_dir.glob("*.tar"):  # same page-cache state for every measurement
        path.read_bytes()
    torch.set_num_threads(1)
    runs = {
        "ceiling": lambda: ceiling_epoch(shard_dir),
        "loader_1_worker": lambda: loader_epoch(shard_dir, 1),
        "loader_2_workers": lambda: loader_epoch(shard_dir, 2),
        "webdataset_2_workers": lambda: webdataset_epoch(shard_dir, "clip", 2),
        "frame_loader_2_workers": lambda: loader_epoch(shard_dir, 2, "frame"),
        "frame_webdataset_2_workers": lambda: webdataset_epoch(shard_dir, "frame", 2),
    }
    rounds = [{name: measure(read) for name, read in runs.items()} for _ in range(repeats)]
    best = {
        name: {
            "samples_per_s": round(max(r[name]["samples_per_s"] for r in rounds), 2),
            "cpu_ms_per_sample": round(min(r[name]["cpu_ms_per_sample"] for r in rounds), 1),
        }
        for name in runs
    }
    rate = {name: best[name]["samples_per_s"] for name in runs}
    result = {
        **best,
        "ratio_1_worker_to_ceiling": round(rate["loader_1_worker"] / rate["ceiling"], 3),
        "speedup_2_workers_over_1": round(rate["loader_2_workers"] / rate["loader_1_worker"], 3),
        "cpu_ratio_ceiling_to_1_worker": round(
            best["ceiling"]["cpu_ms_per_sample"] / best["loader_1_worker"]["cpu_ms_per_sample"], 3
        ),
        "clip_over_webdataset": round(rate["loader_2_workers"] / rate["webdataset_2_workers"], 3),
        "frame_over_webdataset": round(rate["frame_loader_2_workers"] / rate["frame_webdataset_2_workers"], 3),
        "samples": json.loads((shard_dir / "manifest.json").read_text())["num_samples"],
        "repeats": repeats,
        "cpu_cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    result["met"] = (
        result["ratio_1_worker_to_ceiling"] >= TARGET_1_WORKER
        and result["speedup_2_workers_over_1"] > 1.0
        and min(result["clip_over_webdataset"], result["frame_over_webdataset"]) >= TARGET_WEBDATASET
    )
    return result


def section(result: dict) -> str:
    described = {
        "ceiling": "clip",
        "loader_1_worker": "clip",
        "loader_2_workers": "clip",
        "webdataset_2_workers": "clip",
        "frame_loader_2_workers": "frame",
        "frame_webdataset_2_workers": "frame",
    }
    rows = [
        [name.removeprefix("frame_"), mode, result[name]["samples_per_s"], result[name]["cpu_ms_per_sample"]]
        for name, mode in described.items()
    ]
    return "\n".join(
        [
            "## 2. Loader",
            "",
            f"What: samples/s of `build_loader` in `clip` mode ({NUM_FRAMES} frames at {IMAGE_SIZE} px, whole audio, "
            f"batches of {BATCH_SIZE['clip']}) and `frame` mode (the middle frame at {IMAGE_SIZE} px, the prompt of "
            "the "
            f"labels, batches of {BATCH_SIZE['frame']}), against a minimal single-process reader doing the same "
            "clip-mode "
            "work (tarfile, PIL decode and resize/crop, wave) and against webdataset's own pipeline (DataPipeline, "
            "tarfile_to_samples, split_by_worker, map, batched; WebLoader) decoding only the frames each sample uses, "
            f"over the same {result['samples']} synthetic clips (15-40 frames of 455x256 JPEG each) in the same run. "
            "Every reader yields uint8 frames (the trainer normalises them on the device).",
            "",
            f"How: `benchmarks/bench_loader.run`, best of {result['repeats']} interleaved rounds; CPU ms per sample "
            "counts the main process and its finished workers.",
            "",
            table(["reader", "mode", "samples/s", "CPU ms/sample"], rows),
            "",
            f"1 worker / ceiling: **{result['ratio_1_worker_to_ceiling']}** (target >= {TARGET_1_WORKER}); "
            f"2 workers / 1 worker: **{result['speedup_2_workers_over_1']}** (target > 1); "
            f"2 workers / webdataset with 2 workers: clip mode **{result['clip_over_webdataset']}**, frame mode "
            f"**{result['frame_over_webdataset']}** (target >= {TARGET_WEBDATASET} in both): {verdict(result['met'])}. "
            f"CPU per sample, ceiling / 1 worker: {result['cpu_ratio_ceiling_to_1_worker']}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shard_dir", nargs="?", help="shards with a manifest.json (default: synthetic)")
    args = parser.parse_args()
    if args.shard_dir:
        print(json.dumps(run(args.shard_dir), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(write_synthetic_shards(Path(tmp))), indent=2))


if __name__ == "__main__":
    main()
