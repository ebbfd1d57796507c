"""What the tests share, besides their fixtures (conftest.py): data made to order (synthetic clips packed into
shards, shards written straight in the builder's format, the GRID clips' labels), tiny encoder specs, launching
trainers as real processes (one rank held back on request), polling with a deadline, reading TensorBoard logs."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import psutil
import torch
import webdataset
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from emi import EMI_EMOTIONS
from emi.data import DataInfo, DecodeSpec, ImageSpec, LoaderSpec, Sampling, Workers, build_loader
from emi.formats.fusion import EncodersRecord, FusionRecord, FusionSpec
from emi.formats.manifest import Preprocessing
from emi.io import folder_records
from emi.models.fusion import FusionModel
from emi.models.fusion_checkpoint import save_fusion
from emi.serve.features import clip_features, clip_loader, fusion_batch, load_frozen_encoders
from emi.shards.build import build_shards
from emi.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "tests" / "data" / "grid"  # 8 real GRID talking-face clips (CC BY 4.0, see its README.md)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
EMI = [sys.executable, "-m", "emi.cli"]  # the command line, with this interpreter


def synthetic_split(
    root: Path, split: str, clips: int, seed: int, frame_size: int = 64, shard_size: int = 16, **corruption
) -> Path:
    """Synthesise `clips` mp4 clips and pack them into `root/shards/<split>`; returns the shard folder."""
    source = root / "synth" / split
    synthesize(out=source, clips=clips, seed=seed, workers=2, **corruption)
    out = root / "shards" / split
    summary = build_shards(
        videos=source / "videos",
        labels=source / "labels.csv",
        out=out,
        split=split,
        frame_size=frame_size,
        shard_size=shard_size,
        workers=2,
        transcripts=source / "transcripts.csv",
    )
    assert summary.num_failed == 0, summary.describe()
    return out


def flat_loader(shards, manifest=None, **settings) -> DataInfo:
    """build_loader with its settings as one flat set of keywords: the fields of DecodeSpec, Sampling and Workers."""
    parts = [
        {name: value for name, value in settings.items() if name in {f.name for f in fields(group)}}
        for group in (DecodeSpec, Sampling, Workers)
    ]
    unknown = set(settings) - {name for part in parts for name in part}
    assert not unknown, f"not a loader setting: {sorted(unknown)}"
    if "label_names" in parts[0]:
        parts[0]["label_names"] = tuple(parts[0]["label_names"])
    return build_loader(shards, LoaderSpec(DecodeSpec(**parts[0]), Sampling(**parts[1]), Workers(**parts[2])), manifest)


def layout_loader(shards, layout, rank: int = 0, **settings) -> DataInfo:
    """A clip-mode training loader (shuffled, drop_last, small frames) for rank `rank` of `layout`
    (emi.formats.checkpoint.Layout: processes, workers, batch size), as the re-dealing and mixing tests use it."""
    options = dict(
        mode="clip",
        num_frames=2,
        batch_size=layout.batch_size,
        num_workers=layout.num_workers,
        world_size=layout.world_size,
        rank=rank,
        seed=3,
        shuffle=True,
        drop_last=True,
        shuffle_buffer=5,
        train=True,
        image=ImageSpec(size=16),
    )
    return flat_loader(shards, **{**options, **settings})


def ffmpeg(*args: str) -> None:
    """Run the ffmpeg command line (quiet, overwriting), failing on its error."""
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True)


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def launch_command(script: str, args: list[str], num_processes: int = 2) -> list[str]:
    """`accelerate launch` of a script in the repository, or of a module when `script` is "-m"."""
    target = ["-m"] if script == "-m" else [str(REPO / script)]
    return [
        *ACCELERATE,
        "--config_file",
        str(REPO / "configs/accelerate/cpu.yaml"),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
        *target,
        *args,
    ]


def free_port() -> int:
    """A port nobody listens on now, so tests do not meet other jobs on torch's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(script: str, args: list[str], num_processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a training entry point under `accelerate launch` with gloo on the CPU; fail with its log on error."""
    result = subprocess.run(
        launch_command(script, args, num_processes),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    return result


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, alive: subprocess.Popen | None = None):
    """Poll `condition` until it returns something true (returned), failing after `timeout_s` seconds or as soon as
    `alive` (a process the condition waits on) has ended."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (exit code {alive.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.02)
    return value


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The process of `rank` among the launcher's descendants (the one whose parent is not of that rank: not its
    dataloader workers), None while it has not started."""

    def rank_of(process: psutil.Process) -> str | None:
        try:
            return process.environ().get("RANK")
        except psutil.Error:  # ended meanwhile, or not ours to read
            return None

    try:
        descendants = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    return next(
        (
            process
            for process in descendants
            if rank_of(process) == str(rank) and rank_of(process.parent()) != str(rank)
        ),
        None,
    )


@dataclass
class HeldBackRun:
    returncode: int
    output: str  # stdout and stderr, interleaved
    released_at: str  # the output when the held rank was let go


def launch_holding_back(
    args: list[str],
    held_rank: int,
    hold_when: Callable[[], object],
    release_when: str,
    log: Path,
    num_processes: int = 2,
    timeout_s: float = 600,
    before_release: Callable[[], None] | None = None,
) -> HeldBackRun:
    """`accelerate launch -m ARGS` on `num_processes` ranks, with `held_rank` stopped (SIGSTOP) once `hold_when()`
    is true (it is mid-way through its share: past the process group's start, which needs every rank) until the
    output shows `release_when` (what the other ranks print once they wait for it); then `before_release()` runs
    (the test's look at the world while the rank is still held) and the rank continues. Returns the exit code and
    the output, which `log` (a file) holds too."""
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            launch_command("-m", args, num_processes), cwd=REPO, env=cpu_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        held = wait_until(lambda: rank_process(launcher, held_rank), timeout_s, f"rank {held_rank} to start", launcher)
        wait_until(hold_when, timeout_s, f"rank {held_rank} to reach the point where it is held", launcher)
        held.suspend()
        released_at = wait_until(
            lambda: release_when in (text := log.read_text()) and text,
            timeout_s,
            f"{release_when!r} in the output",
            launcher,
        )
        if before_release is not None:
            before_release()
        held.resume()
        launcher.wait(timeout=timeout_s)
    except AssertionError as err:
        raise AssertionError(f"{err}; output:\n{log.read_text()[-6000:]}") from None
    finally:
        if launcher.poll() is None:
            for process in psutil.Process(launcher.pid).children(recursive=True):
                process.kill()
            launcher.kill()
            launcher.wait()
    return HeldBackRun(launcher.returncode, log.read_text(), released_at)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, over every event file of the run (resumed runs have several)."""
    points: dict[int, float] = {}
    for events in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return sorted(points.items())


def exported(run_dir: Path) -> dict:
    """Every tensor a Stage I run exported (encoders and projection heads), keyed by file and name."""
    weights = {}
    for encoder in ("vision", "text", "audio"):
        for name, tensor in load_file(str(run_dir / "export" / encoder / "model.safetensors")).items():
            weights[f"{encoder}.{name}"] = tensor
    for name, tensor in load_file(str(run_dir / "export" / "projection.safetensors")).items():
        weights[f"projection.{name}"] = tensor
    return weights


# --------------------------------------------------------------------- shards in the builder's format (emi.data)

FPS = 5


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes((np.clip(waveform, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def grey_level(frame: int) -> int:
    """The grey level of frame `frame` in pattern="grey" shards: frames are told apart by it."""
    return 20 + 10 * frame


def make_sample(
    key: str,
    index: int,
    num_frames: int,
    *,
    size: tuple[int, int],
    sample_rate: int,
    pattern: str,
    rng: np.random.Generator,
) -> dict[str, bytes]:
    width, height = size
    sample = {}
    for frame in range(num_frames):
        if pattern == "grey":
            pixels = np.full((height, width, 3), grey_level(frame), dtype=np.uint8)
        else:
            y, x = np.mgrid[0:height, 0:width]
            base = (x * 3 + y * 2 + 29 * index + 11 * frame) % 256
            pixels = np.stack([base, (base + 80) % 256, (255 - base)], axis=-1).astype(np.uint8)
        sample[f"{frame:04d}.jpg"] = jpeg_bytes(pixels)
    length = num_frames * sample_rate // FPS
    t = np.arange(length) / sample_rate
    waveform = 0.3 * np.sin(2 * math.pi * (200 + 10 * index) * t) + 0.01 * rng.standard_normal(length)
    sample["wav"] = wav_bytes(waveform, sample_rate)
    labels = {name: round(float(rng.uniform()), 3) for name in EMI_EMOTIONS}
    transcript = f"clip {key} speaks"
    sample["txt"] = transcript.encode()
    sample["json"] = json.dumps(
        {
            "key": key,
            "source": f"{key}.mp4",
            "split": "train",
            "fps": FPS,
            "num_frames": num_frames,
            "duration_s": num_frames / FPS,
            "sample_rate": sample_rate,
            "has_audio": True,
            "labels": labels,
            "transcript": transcript,
            "face_crop": False,
        }
    ).encode()
    return sample


def write_shards(
    out: Path,
    sizes: Sequence[int],
    *,
    split: str = "train",
    frames: tuple[int, int] = (3, 7),
    size: tuple[int, int] = (64, 48),
    sample_rate: int = 16000,
    pattern: str = "gradient",
    manifest: bool = True,
    edits: dict[str, dict[str, bytes | None]] | None = None,
    seed: int = 0,
    key_prefix: str = "",
) -> list[list[str]]:
    """Write `<split>-NNNNNN.tar` shards of sizes[i] samples (keys `<key_prefix>s<shard>-<index>`) and a manifest.

    Each sample has 3..7 frames (size = width, height) at 5 fps, a 16-bit PCM wav as long as the frames
    span, a transcript and labels for the six emotions. `edits[key][ext]` replaces an entry, None drops
    it. Returns the keys, per shard, in tar order.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    edits = edits or {}
    keys, entries, index = [], [], 0
    for shard, count in enumerate(sizes):
        name = f"{split}-{shard:06d}.tar"
        shard_keys = [f"{key_prefix}s{shard}-{i:03d}" for i in range(count)]
        with webdataset.TarWriter(str(out / name), encoder=False) as writer:
            for key in shard_keys:
                num_frames = int(rng.integers(frames[0], frames[1] + 1))
                sample = make_sample(
                    key, index, num_frames, size=size, sample_rate=sample_rate, pattern=pattern, rng=rng
                )
                for ext, data in edits.get(key, {}).items():
                    if data is None:
                        sample.pop(ext, None)
                    else:
                        sample[ext] = data
                writer.write({"__key__": key, **sample})
                index += 1
        data = (out / name).read_bytes()
        keys.append(shard_keys)
        entries.append(
            {
                "name": name,
                "num_samples": count,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "keys": shard_keys,
            }
        )
    if manifest:
        (out / "manifest.json").write_text(
            json.dumps({"format": "emi-shards/1", "split": split, "shards": entries, "num_samples": sum(sizes)})
        )
    return keys


class PickleBomb:
    """Unpickling this creates a file: proof that a loader unpickled a member."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


# ------------------------------------------------------------------------------------------------ loader epochs


def run_epoch(data, epoch: int, skip_batches: int = 0) -> list[dict]:
    data.set_epoch(epoch, skip_batches=skip_batches)
    return list(data.dataloader)


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


# ------------------------------------------------------------------------------------- the GRID clips' labels

KEYS = sorted(path.stem for path in GRID.glob("*.mpg"))


EXPRESSIONS = ["Happiness", "Neutral", "Surprise", "Sadness"]


def grid_labels(keys: list[str]) -> dict[str, dict]:
    """Made-up labels: six EMI floats, a Valence float that may be negative, an Expression string."""
    rng = np.random.default_rng(0)
    return {
        key: {
            **{name: round(float(rng.uniform(0, 1)), 4) for name in EMI_EMOTIONS},
            "Valence": round(float(rng.uniform(-1, 1)), 4),
            "Expression": EXPRESSIONS[i % 4],
        }
        for i, key in enumerate(keys)
    }


def write_labels(path: Path, labels: dict[str, dict], with_extension: bool = False) -> Path:
    columns = ["Filename", *EMI_EMOTIONS, "Valence", "Expression"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for key, row in labels.items():
            writer.writerow([key + ".mpg" if with_extension else key, *(row[c] for c in columns[1:])])
    return path


# ---------------------------------------------------------------------------------------- tiny encoder specs

VISION_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 64,
    "patch_size": 8,
}


CLIP_SPEC = {"arch": "clip", "pretrained": None, "config": VISION_CONFIG}


VIT_SPEC = {"arch": "vit", "pretrained": None, "config": VISION_CONFIG}


BERT_SPEC = {
    "arch": "bert",
    "pretrained": None,
    "config": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
    },
}


WAV2VEC2_SPEC = {
    "arch": "wav2vec2",
    "pretrained": None,
    "config": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "conv_dim": [32] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "mask_time_prob": 0.0,
        "layerdrop": 0.0,
    },
}


# -------------------------------------------------------- a Stage II checkpoint on the GRID clips (emi.serve tests)

CLIPS = sorted(GRID.glob("*.mpg"))


NUM_FRAMES = 8  # the GRID clips have 15 frames at 5 fps: the fusion model sees them subsampled


PREPROCESSING = {"fps": 5.0, "sample_rate": 16000, "frame_size": 64, "face_crop": "none", "asr": "none"}


FUSION = {
    "vision_dim": 64,
    "audio_dim": 64,
    "text_dim": 64,
    "d_model": 32,
    "num_segments": 4,
    "tcn_layers": 2,
    "lstm_hidden": 16,
    "transformer_layers": 1,
    "transformer_heads": 2,
    "dropout": 0.0,
}


def model_predictions(model: FusionModel, features: dict) -> torch.Tensor:
    """The model called on a Stage II batch as training feeds it (emi/stages/stage2.py)."""
    present = torch.stack(
        [features["vision_mask"].any(1), features["has_audio"] & features["audio_mask"].any(1), features["has_text"]],
        dim=1,
    )
    with torch.no_grad():
        return model(
            vision=features["vision"],
            vision_mask=features["vision_mask"],
            audio=features["audio"],
            audio_mask=features["audio_mask"],
            text=features["text"],
            present=present,
        )["pred"]


def direct_batches(encoders: Path, clip_shards: Path, batch_size: int):
    """(clip batch, Stage II batch) over clip shards, computed by hand with the features module."""
    frozen = load_frozen_encoders(encoders)
    data = clip_loader(str(clip_shards), frozen, list(EMI_EMOTIONS), batch_size, num_workers=0)
    data.set_epoch(0)
    for batch in data.dataloader:
        yield batch, fusion_batch(clip_features(frozen, batch, fps=PREPROCESSING["fps"]), NUM_FRAMES)


def spread_head(model: FusionModel, features: dict) -> None:
    """A random model predicts nearly one value for every clip, so that float rounding would decide the Pearson
    checks: centre and scale the last layer's logits over the test clips to mean 0 and std 1 per emotion."""
    inputs = []
    hook = model.head[-1].register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    model_predictions(model, features)
    hook.remove()
    with torch.no_grad():
        weight = model.head[-1].weight
        weight /= (inputs[0] @ weight.T).std(0)[:, None]
        model.head[-1].bias.copy_(-(inputs[0] @ weight.T).mean(0))


def save_checkpoint(
    folder: Path, encoders: Path, labels: list[str], features: dict | None = None, seed: int = 0, **model_options
) -> Path:
    record = FusionRecord(
        spec=FusionSpec.from_dict({**FUSION, **model_options, "num_outputs": len(labels)}, "test"),
        labels=labels,
        encoders=EncodersRecord(str(encoders), folder_records(encoders)),
        preprocessing=Preprocessing(**PREPROCESSING),
        num_frames=NUM_FRAMES,
    )
    torch.manual_seed(seed)
    model = FusionModel(record.spec).eval()
    if features is not None:
        spread_head(model, features)
    save_fusion(folder, model.state_dict(), record, encoders)
    return folder
