"""Loader throughput against webdataset's own pipeline, in `frame` mode (Stage I: one frame at 224 px and the prompt
of the labels) and `clip` mode (Stage II features, predict: 16 frames at 224 px and the whole audio), with the shared
method of benchmarks/harness.py.

Three readers per mode, 2 workers each, one epoch (a new loader, its workers started and joined in it) per round:
1. emi: `build_loader` with a LoaderSpec (eval, unshuffled).
2. webdataset with emi's decode: webdataset's pipeline (DataPipeline: shard list, split_by_worker,
   tarfile_to_samples keeping only the entries the mode uses, map, batched; WebLoader) calling the functions emi's
   loader calls on a sample (`entries_to_read` picks the frames, `decode_sample` decodes and resizes them, `collate`
   batches): the same tensors, so only the pipelines differ.
3. webdataset with PIL: the same pipeline as a user would write it with PIL (the same frames, PIL's bicubic resize of
   the centre square, `wave`).
A fourth contender per mode is the floor: JPEG decode + resize (emi's `open_jpeg` and `load_frame`) of exactly the
frames the epoch uses, held in memory beforehand, in this one process. Every epoch returns the number of unique
sample keys it yielded; every reader must yield the same keys. CPU counts this process and its workers (each epoch
joins its workers, so RUSAGE_CHILDREN holds them; an epoch that leaves one running fails the benchmark).

Targets (median over the rounds of the ratio taken within each round): emi >= 1.0x webdataset with emi's decode in
frame mode and >= 1.1x in clip mode. Reported beside them: emi over webdataset with PIL, and each reader's CPU per
sample over the floor's.

    python -m benchmarks.bench_loader [--quick]    (writes synthetic clips to a temp dir, prints the section)
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import tarfile
import tempfile
import wave
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import webdataset
from PIL import Image

from benchmarks import harness
from benchmarks.harness import same_keys, show, spread_json
from emi import EMI_EMOTIONS
from emi.data import AudioSpec, DecodeSpec, ImageSpec, LoaderSpec, Sampling, Workers, build_loader
from emi.data.decode import frame_view, load_frame, open_jpeg, sample_rng, selection_rng
from emi.data.modes import WANTED, collate, decode_sample, entries_to_read
from emi.data.plan import samples_per_consumer
from emi.data.reader import RawSample
from emi.prompts import build_prompt
from emi.shards.files import ShardWriter

NUM_FRAMES, IMAGE_SIZE, WORKERS = 16, 224, 2
MODES = ("frame", "clip")
BATCH_SIZE = {"frame": 32, "clip": 8}
TARGET = {"frame": 1.0, "clip": 1.1}  # emi over webdataset with emi's decode
CONTENDERS = {  # per mode: the three readers, then the floor
    "emi": "emi (build_loader)",
    "wds_emi": "webdataset, emi's decode",
    "wds_pil": "webdataset, PIL",
    "floor": "floor: decode + resize only, 1 process",
}
EMI_OVER = {"wds_emi": "over_baseline", "wds_pil": "over_pil"}  # the ratio of emi over each webdataset reader
# Clips of 2-4 s at 5 fps with 128 px frames. Frame mode decodes one frame per clip, clip mode 16: frame mode reads
# every shard and clip mode the first CLIP_SHARDS, so that an epoch lasts seconds in both (6400 clips: ~4-5 s of emi
# on 2 idle cores; 800 clips: ~4-6 s; the whole run ~4 min). Both counts are whole batches per worker, so emi's loader
# pads neither epoch (emi_padding).
HEIGHT, FRAME_COUNTS, SHARD_SIZE = 128, (10, 20), 100
SHARDS, CLIP_SHARDS, ROUNDS = 64, 8, harness.MIN_ROUNDS
QUICK_SHARD_SIZE, QUICK_SHARDS, QUICK_CLIP_SHARDS, QUICK_ROUNDS = 16, 4, 2, 2


def write_synthetic_shards(
    out: Path, num_clips: int = 200, shard_size: int = 50, seed: int = 0, *, height: int = 256,
    frame_counts: tuple[int, int] = (15, 40),
) -> Path:  # fmt: skip
    """Clips of `frame_counts` frames (inclusive; 5 fps) of 16:9 JPEG (quality 90, `height` short side) with 16 kHz
    audio, in the shard builder's tar layout, with a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = round(height * 16 / 9)
    # A textured scene (a smooth pattern plus noise, so JPEGs are as large as real frames) that each frame shows
    # through a window moving over 128 offsets: each offset's JPEG is encoded once.
    y, x = np.mgrid[0:height, 0 : width + 128]
    scene = 128 + 60 * np.sin(x / 23.0) * np.cos(y / 17.0) + rng.normal(0, 8, x.shape)
    scene = np.clip(scene[..., None] + [0, 20, -20], 0, 255).astype(np.uint8)
    jpegs = [_jpeg(scene[:, offset : offset + width]) for offset in range(128)]
    shards = []
    for start in range(0, num_clips, shard_size):
        name = f"train-{start // shard_size:06d}.tar"
        keys = [f"{i:05d}" for i in range(start, min(start + shard_size, num_clips))]
        writer = ShardWriter(out / name)  # the shard builder's writer: the same tar layout as real shards
        for key in keys:
            writer.add(key, _synthetic_clip(key, rng, jpegs, frame_counts))
        writer.finish()
        shards.append({"name": name, "num_samples": len(keys)})
    (out / "manifest.json").write_text(
        json.dumps({"format": "emi-shards/1", "split": "train", "shards": shards, "num_samples": num_clips})
    )
    return out


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _synthetic_clip(
    key: str, rng: np.random.Generator, jpegs: list[bytes], frame_counts: tuple[int, int]
) -> list[tuple[str, bytes]]:
    """One clip's tar entries: json, txt, wav and its frames."""
    num_frames = int(rng.integers(frame_counts[0], frame_counts[1] + 1))
    first = int(rng.integers(128))
    frames = [(f"{key}.{frame:04d}.jpg", jpegs[(first + 3 * frame) % 128]) for frame in range(num_frames)]
    pcm = (rng.normal(0, 0.1, num_frames * 16000 // 5) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm.tobytes())
    meta = {"key": key, "fps": 5, "num_frames": num_frames, "sample_rate": 16000, "has_audio": True,
            "labels": {"Joy": 0.5}}  # fmt: skip
    return [
        (f"{key}.json", json.dumps(meta).encode()),
        (f"{key}.txt", b"a transcript"),
        (f"{key}.wav", buffer.getvalue()),
        *frames,
    ]


def decode_spec(mode: str) -> DecodeSpec:
    """What emi's loader makes of a sample in `mode`: eval views, uint8 frames, the whole audio."""
    return DecodeSpec(mode, num_frames=NUM_FRAMES, image=ImageSpec(size=IMAGE_SIZE), audio=AudioSpec(seconds=0),
                      prompt_fn=build_prompt)  # fmt: skip


def emi_batches(urls: list[str], mode: str, workers: int) -> Iterable[dict[str, Any]]:
    """One epoch of a new `build_loader` (eval, unshuffled, workers not persistent: joined when the epoch ends)."""
    spec = LoaderSpec(decode_spec(mode), Sampling(BATCH_SIZE[mode]), Workers(workers, pin_memory=False,
                      persistent_workers=False))  # fmt: skip
    data = build_loader(urls, spec)
    data.set_epoch(0)
    return data.dataloader


# webdataset's sample dicts: "__key__", "__url__" and the like, then one entry per extension.
def _entries(sample: dict[str, Any]) -> dict[str, bytes]:
    return {name: data for name, data in sample.items() if not name.startswith("__")}


class EmiDecode:
    """webdataset sample -> emi's decoded sample, with the calls emi's loader makes: `entries_to_read` picks the
    frames, `decode_sample` decodes and resizes them (seed 0, epoch 0, as the loader's epoch 0)."""

    def __init__(self, mode: str):
        self.spec = decode_spec(mode)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key, entries = sample["__key__"], _entries(sample)
        chosen = entries_to_read(list(entries), self.spec, selection_rng(0, 0, key))
        raw = RawSample(key, sample["__url__"], {name: entries[name] for name in chosen})
        return decode_sample(raw, self.spec, sample_rng(0, 0, key))

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.spec)


def _frame_names(entries: dict[str, bytes]) -> list[str]:
    return sorted(name for name in entries if name.endswith(".jpg"))


def _pil_frame(data: bytes) -> torch.Tensor:
    """A JPEG's centre square resized (PIL bicubic) to IMAGE_SIZE, uint8 [3, H, W]."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    side = min(image.size)  # resize short side + centre crop, as one resize of the centre square
    left, top = round((image.width - side) / 2), round((image.height - side) / 2)  # whole pixels, as torchvision
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _pil_waveform(data: bytes) -> torch.Tensor:
    with wave.open(io.BytesIO(data)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)


def pil_sample(mode: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """webdataset sample -> tensors, as a user writes it with PIL: the middle frame (frame mode) or 16 frames spread
    evenly (clip mode), labels, and the prompt or the transcript and audio."""

    def to_sample(sample: dict[str, Any]) -> dict[str, Any]:
        entries = _entries(sample)
        frames, meta = _frame_names(entries), json.loads(entries["json"])
        labels = torch.tensor([float(meta["labels"].get(name, "nan")) for name in EMI_EMOTIONS])
        out = {"key": sample["__key__"], "labels": labels}
        if mode == "frame":
            return {**out, "pixel_values": _pil_frame(entries[frames[len(frames) // 2]]),
                    "prompt": build_prompt(meta["labels"])}  # fmt: skip
        chosen = np.round(np.linspace(0, len(frames) - 1, min(NUM_FRAMES, len(frames)))).astype(int)
        return {**out, "frames": torch.stack([_pil_frame(entries[frames[i]]) for i in chosen]),
                "audio": _pil_waveform(entries["wav"]), "transcript": entries["txt"].decode()}  # fmt: skip

    return to_sample


def pil_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack, zero-padding frames to NUM_FRAMES and audio to the longest."""
    batch = {"key": [s["key"] for s in samples], "labels": torch.stack([s["labels"] for s in samples])}
    if "pixel_values" in samples[0]:
        pixel_values = torch.stack([s["pixel_values"] for s in samples])
        return {**batch, "pixel_values": pixel_values, "prompt": [s["prompt"] for s in samples]}
    frames = torch.zeros(len(samples), NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    audio = torch.zeros(len(samples), max(len(s["audio"]) for s in samples))
    for row, sample in enumerate(samples):
        frames[row, : len(sample["frames"])] = sample["frames"]
        audio[row, : len(sample["audio"])] = sample["audio"]
    return {**batch, "frames": frames, "audio": audio, "transcript": [s["transcript"] for s in samples]}


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # as emi's workers: the workers are the parallelism


def used_by(mode: str, name: str) -> bool:
    """Whether a tar member holds an entry `mode` uses (emi's WANTED): frame mode passes over the audio and text."""
    return WANTED[mode].fullmatch(name.split(".", 1)[-1]) is not None


def webdataset_batches(urls: list[str], mode: str, workers: int, decode: str) -> Iterable[dict[str, Any]]:
    """One epoch of webdataset's pipeline, each worker its share of the shards, reading only the entries `mode`
    uses; `decode`: "emi" or "pil"."""
    emi = EmiDecode(mode)
    to_sample, collation = (emi, emi.collate) if decode == "emi" else (pil_sample(mode), pil_collate)
    pipeline = webdataset.DataPipeline(
        webdataset.SimpleShardList(urls),
        webdataset.split_by_worker,
        webdataset.tarfile_to_samples(select_files=functools.partial(used_by, mode)),
        webdataset.map(to_sample),
        webdataset.batched(BATCH_SIZE[mode], collation_fn=collation, partial=True),
    )
    return webdataset.WebLoader(pipeline, batch_size=None, num_workers=workers, worker_init_fn=_one_thread)


def reader_batches(reader: str, urls: list[str], mode: str, workers: int = WORKERS) -> Iterable[dict[str, Any]]:
    """One epoch of a reader (not the floor) over `urls` in `mode`."""
    if reader == "emi":
        return emi_batches(urls, mode, workers)
    return webdataset_batches(urls, mode, workers, decode=reader.removeprefix("wds_"))


def used_frames(urls: list[str], mode: str) -> list[list[tuple[str, bytes]]]:
    """Per sample, in order, the (name, JPEG bytes) of the frames emi's loader decodes for it in `mode`."""
    spec, samples = decode_spec(mode), []
    for url in urls:
        with tarfile.open(url) as tar:
            entries: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                if name.endswith(".jpg"):
                    entries.setdefault(key, {})[name] = tar.extractfile(member).read()
        for key, frames in entries.items():
            chosen = entries_to_read(list(frames), spec, selection_rng(0, 0, key))
            samples.append([(name, frames[name]) for name in sorted(chosen)])
    return samples


def decode_and_resize(frames: list[tuple[str, bytes]]) -> list[torch.Tensor]:
    """The floor's work on one sample: its frames decoded and resized by emi's functions, one view per clip."""
    first = open_jpeg(frames[0][1], frames[0][0])
    view = frame_view(*first.size, False, np.random.default_rng(0))
    return [load_frame(open_jpeg(data, name), name, view, IMAGE_SIZE) for name, data in frames]


def new_children(before: set[int]) -> list[int]:
    """Live child processes of this one not among `before`."""
    return [child.pid for child in psutil.Process().children() if child.pid not in before and child.is_running()]


class Contenders:
    """One epoch of each (mode, reader), for harness.interleave, and the unique keys each epoch yielded."""

    def __init__(self, urls: dict[str, list[str]], floor_frames: dict[str, list[list[tuple[str, bytes]]]]):
        self.urls, self.floor_frames = urls, floor_frames
        self.keys: dict[str, list[list[str]]] = {name: [] for name in self.names() if not name.endswith("floor")}

    @staticmethod
    def names() -> list[str]:
        return [f"{mode}_{name}" for mode in MODES for name in CONTENDERS]

    def functions(self) -> dict[str, Callable[[], int]]:
        return {
            f"{mode}_{name}": (lambda mode=mode, name=name: self.run(mode, name))
            for mode in MODES
            for name in CONTENDERS
        }

    def run(self, mode: str, name: str) -> int:
        if name == "floor":
            for frames in self.floor_frames[mode]:
                decode_and_resize(frames)
            return len(self.floor_frames[mode])
        return self.epoch(mode, name)

    def epoch(self, mode: str, reader: str) -> int:
        """Unique keys of one epoch; RuntimeError if a worker outlives it (its CPU would go uncounted)."""
        before = {child.pid for child in psutil.Process().children()}
        keys = sorted({key for batch in reader_batches(reader, self.urls[mode], mode) for key in batch["key"]})
        if left := new_children(before):
            raise RuntimeError(f"{mode} {reader}: workers {left} still run after the epoch; their CPU is not counted")
        self.keys[f"{mode}_{reader}"].append(keys)
        return len(keys)


def summarise(rounds: harness.Rounds) -> dict[str, Any]:
    """Per contender: samples/s and CPU ms per sample, and CPU per sample over its mode's floor; per mode: emi over
    each webdataset reader (the ratio taken within each round), the first against its target."""
    contenders = {
        name: {
            "samples_per_s": asdict(rounds.spread(name)),
            "cpu_ms_per_sample": spread_json([1000 * v for v in rounds.values(name, "cpu_per_unit")]),
            "cpu_over_floor": asdict(rounds.ratio(name, f"{name.split('_')[0]}_floor", "cpu_per_unit")),
        }
        for name in rounds.names
    }
    ratios = {}
    for mode in MODES:
        baseline = rounds.ratio(f"{mode}_emi", f"{mode}_wds_emi")
        ratios[mode] = {
            "over_baseline": {**asdict(baseline), "met": baseline.median >= TARGET[mode]},
            "over_pil": asdict(rounds.ratio(f"{mode}_emi", f"{mode}_wds_pil")),
        }
    return {"contenders": contenders, "ratios": ratios, "met": all(r["over_baseline"]["met"] for r in ratios.values())}


def measure(urls: dict[str, list[str]], rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # as a loader's workers do; the floor is one process on one core
    for path in urls["frame"]:  # same page-cache state for every epoch
        Path(path).read_bytes()
    floor_frames = {mode: used_frames(urls[mode], mode) for mode in MODES}
    contenders = Contenders(urls, floor_frames)
    measured = harness.interleave(contenders.functions(), rounds)
    keys = {
        mode: len(same_keys({n: k for n, k in contenders.keys.items() if n.startswith(mode)}, f"{mode}_emi"))
        for mode in MODES
    }
    return {**summarise(measured), "rounds": measured.to_json(), "load": measured.load(), "unique_keys": keys}


def run(
    work: Path, quick: bool = False, shard_size: int | None = None, shards: int | None = None,
    clip_shards: int | None = None, rounds: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The loader benchmark on synthetic clips written in `work`: frame mode over `shards` shards of `shard_size`
    clips, clip mode over the first `clip_shards` of them."""
    shard_size = shard_size or (QUICK_SHARD_SIZE if quick else SHARD_SIZE)
    shards = shards or (QUICK_SHARDS if quick else SHARDS)
    clip_shards = clip_shards or (QUICK_CLIP_SHARDS if quick else CLIP_SHARDS)
    rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    folder = write_synthetic_shards(Path(work) / "shards", shards * shard_size, shard_size, height=HEIGHT,
                                    frame_counts=FRAME_COUNTS)  # fmt: skip
    tars = [str(path) for path in sorted(folder.glob("*.tar"))]
    result = measure({"frame": tars, "clip": tars[:clip_shards]}, rounds)
    samples = {"frame": shards * shard_size, "clip": clip_shards * shard_size}
    return {
        **result,
        "samples": samples,
        "padded": {mode: emi_padding(samples[mode], mode) for mode in MODES},
        "shards": {"frame": shards, "clip": clip_shards},
        "megabytes": {
            mode: round(sum(Path(t).stat().st_size for t in tars[:n]) / 2**20)
            for mode, n in (("frame", shards), ("clip", clip_shards))
        },  # fmt: skip
        "num_rounds": rounds,
    }


def emi_padding(samples: int, mode: str) -> int:
    """The samples emi's loader decodes twice in an epoch: it rounds each worker's share up to whole batches."""
    return samples_per_consumer(samples, WORKERS, BATCH_SIZE[mode], drop_last=False) * WORKERS - samples


def contender_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mode in MODES:
        for name, described in CONTENDERS.items():
            measured = result["contenders"][f"{mode}_{name}"]
            emi_over = f"**{show(result['ratios'][mode][EMI_OVER[name]])}**" if name in EMI_OVER else ""
            rows.append([mode, described, show(measured["samples_per_s"], 0), show(measured["cpu_ms_per_sample"]),
                         show(measured["cpu_over_floor"]), emi_over])  # fmt: skip
    return rows


def section(result: dict[str, Any]) -> str:
    header = ["mode", "reader", "samples/s", "CPU ms/sample", "CPU / floor's", "emi / this (samples/s)"]
    ratios = result["ratios"]
    targets = {mode: f"{show(ratios[mode]['over_baseline'])} (target >= {TARGET[mode]}: "
               f"{harness.verdict(ratios[mode]['over_baseline']['met'])})" for mode in MODES}  # fmt: skip
    return harness.render(
        "bench_loader",
        frames=NUM_FRAMES, size=IMAGE_SIZE, workers=WORKERS, frame_batch=BATCH_SIZE["frame"],
        clip_batch=BATCH_SIZE["clip"], height=HEIGHT, width=round(HEIGHT * 16 / 9), low=FRAME_COUNTS[0],
        high=FRAME_COUNTS[1], frame_samples=result["samples"]["frame"], frame_shards=result["shards"]["frame"],
        frame_mb=result["megabytes"]["frame"], clip_samples=result["samples"]["clip"],
        clip_shards=result["shards"]["clip"], clip_mb=result["megabytes"]["clip"], rounds=result["num_rounds"],
        frame_padded=result["padded"]["frame"], clip_padded=result["padded"]["clip"],
        load=result["load"], table=harness.table(header, contender_rows(result)), frame_target=targets["frame"],
        clip_target=targets["clip"], frame_pil=show(ratios["frame"]["over_pil"]),
        clip_pil=show(ratios["clip"]["over_pil"]), verdict=harness.verdict(result["met"]),
    )  # fmt: skip


def summary(result: dict[str, Any]) -> list[list[str]]:
    return [
        [f"loader samples/s, {mode} mode, emi / webdataset with emi's decode",
         show(ratio["over_baseline"]), f">= {TARGET[mode]}", "yes" if ratio["over_baseline"]["met"] else "**no**"]
        for mode, ratio in result["ratios"].items()
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, 2 rounds: a check of the plumbing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emi-bench-loader-") as tmp:
        print(section(run(Path(tmp), quick=args.quick)))


if __name__ == "__main__":
    main()
