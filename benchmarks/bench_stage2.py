"""Stage II epoch from cached feature shards against the same epoch recomputing the encoder features on the fly.

Both epochs train the same FusionModel (configs/stage2/tiny.yaml, same initial weights, AdamW, masked MSE as in
emi/stages/stage2.py) on the same clips in the same order and batches. Cached: the `features` loader over the npy
feature shards written by `emi features extract`. On the fly: the `clip` loader over the clip shards (JPEG and
WAV decoding), the frozen Stage I encoders (`emi.serve.features.clip_features`) and `fusion_batch`, which lays the
features out exactly as the `features` loader does. The encoders are tiny random-init Stage I encoders
(configs/stage1/tiny.yaml), exported and loaded once before timing; extraction itself is not timed.

Both epochs run in interleaved rounds (benchmarks/harness.py); the speed-up is the median of the per-round ratios of
samples/s, cached over on the fly. Target: cached at least TARGET times as fast.

    python -m benchmarks.bench_stage2 [SHARD_DIR] [--quick]    (no folder: synthetic clip shards in a temp dir)
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks import harness
from benchmarks.bench_loader import write_synthetic_shards
from benchmarks.harness import same_keys, show, spread_json
from emi import EMI_EMOTIONS
from emi.config import Stage2Config, load_config
from emi.data import DecodeSpec, LoaderSpec, Sampling, Workers, build_loader
from emi.formats.fusion import FusionSpec
from emi.formats.manifest import read_manifest
from emi.models.encoders import ContrastiveModel, build_tokenizer, export_encoders
from emi.models.fusion import FusionModel, fusion_inputs
from emi.models.losses import RegressionLoss
from emi.serve.features import (
    FrozenEncoders,
    clip_features,
    clip_loader,
    extract_features,
    fusion_batch,
    load_frozen_encoders,
)

REPO = Path(__file__).resolve().parents[1]
STAGE1_TINY = REPO / "configs" / "stage1" / "tiny.yaml"
STAGE2_TINY = REPO / "configs" / "stage2" / "tiny.yaml"
LABELS = list(EMI_EMOTIONS)
MSE = RegressionLoss({"mse": 1.0})
CLIPS, QUICK_CLIPS, ROUNDS = 160, 8, harness.MIN_ROUNDS
BATCH_SIZE, WORKERS = 8, 1
# Cached features skip decoding and the encoders; with these tiny encoders the gap is small, with ViT-L far larger.
TARGET = 2.0


def extract_tiny_features(clip_shards: Path, work: Path) -> tuple[Path, Path]:
    """Export tiny random-init Stage I encoders and extract the clips' features: (encoders, feature shards)."""
    spec = yaml.safe_load(STAGE1_TINY.read_text())["model"]
    torch.manual_seed(0)
    model = ContrastiveModel(spec["vision"], spec["text"], spec["audio"], spec["embed_dim"])
    encoders = export_encoders(model, model.state_dict(), work / "export", build_tokenizer(spec["text"]))
    features = work / "features"
    extract_features(encoders, str(clip_shards), features, batch_size=8, num_workers=0)
    return encoders, features


def fusion_model(dims: dict[str, int]) -> tuple[FusionModel, torch.optim.Optimizer]:
    """The Stage II tiny model, always with the same initial weights, and its AdamW."""
    config = load_config(Stage2Config, STAGE2_TINY)
    torch.manual_seed(0)
    model = FusionModel(
        FusionSpec(
            vision_dim=dims["vision"],
            audio_dim=dims["audio"],
            text_dim=dims["text"],
            num_outputs=len(LABELS),
            options=config.model,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    return model.train(), optimizer


def train_step(model: FusionModel, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    loss, _ = MSE(model(**fusion_inputs(batch))["pred"], batch["labels"], batch["label_mask"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cached_epoch(features: Path, dims: dict[str, int], batch_size: int, workers: int) -> list[str]:
    decode = DecodeSpec("features", num_frames=0, label_names=tuple(LABELS))
    data = build_loader(
        str(features), LoaderSpec(decode, Sampling(batch_size), Workers(workers, persistent_workers=False))
    )
    data.set_epoch(0)
    model, optimizer = fusion_model(dims)
    keys = []
    for batch in data.dataloader:
        train_step(model, optimizer, batch)
        keys += batch["key"]
    return keys


def on_the_fly_epoch(
    clip_shards: Path, encoders: FrozenEncoders, fps: float, batch_size: int, workers: int
) -> list[str]:
    data = clip_loader(str(clip_shards), encoders, LABELS, batch_size, workers)
    data.set_epoch(0)
    model, optimizer = fusion_model(encoders.dims)
    keys = []
    for batch in data.dataloader:
        features = fusion_batch(clip_features(encoders, batch, fps), num_frames=0)
        features["labels"], features["label_mask"] = batch["labels"], batch["label_mask"]
        train_step(model, optimizer, features)
        keys += batch["key"]
    return keys


def run(work: Path, quick: bool = False, clip_shards: Path | None = None, rounds: int | None = None) -> dict:
    """The Stage II benchmark; `clip_shards`: clip shards with a manifest (default: synthetic ones written in
    `work`)."""
    torch.set_num_threads(1)
    work = Path(work)
    if clip_shards is None:
        clips = QUICK_CLIPS if quick else CLIPS
        clip_shards = write_synthetic_shards(work / "clips", num_clips=clips, shard_size=max(clips // 4, 1))
    encoder_dir, features = extract_tiny_features(clip_shards, work)
    encoders = load_frozen_encoders(encoder_dir)
    fps = read_manifest(clip_shards).preprocessing.fps
    keys: dict[str, list[list[str]]] = {"cached": [], "on_the_fly": []}

    def cached() -> int:
        keys["cached"].append(cached_epoch(features, encoders.dims, BATCH_SIZE, WORKERS))
        return len(set(keys["cached"][-1]))

    def on_the_fly() -> int:
        keys["on_the_fly"].append(on_the_fly_epoch(clip_shards, encoders, fps, BATCH_SIZE, WORKERS))
        return len(set(keys["on_the_fly"][-1]))

    measured = harness.interleave({"cached": cached, "on_the_fly": on_the_fly}, rounds or (2 if quick else ROUNDS))
    reference = same_keys(keys, "cached")  # the same clips, in the same order
    speedup = measured.ratio("cached", "on_the_fly")
    return {
        "clips": len(set(reference)),
        "samples": len(reference),
        "batch_size": BATCH_SIZE,
        "workers": WORKERS,
        "num_rounds": len(measured.rounds),
        "samples_per_s": {name: asdict(measured.spread(name)) for name in measured.names},
        "cpu_ms_per_sample": {
            name: spread_json([1000 * v for v in measured.values(name, "cpu_per_unit")]) for name in measured.names
        },
        "speedup": {**asdict(speedup), "met": speedup.median >= TARGET},
        "rounds": measured.to_json(),
        "load": measured.load(),
    }


def section(result: dict) -> str:
    names = {"cached": "cached feature shards", "on_the_fly": "features on the fly"}
    rows = [
        [label, show(result["samples_per_s"][name], 1), show(result["cpu_ms_per_sample"][name], 1)]
        for name, label in names.items()
    ]
    return harness.render(
        "bench_stage2",
        clips=result["clips"],
        samples=result["samples"],
        batch=result["batch_size"],
        workers=result["workers"],
        rounds=result["num_rounds"],
        load=result["load"],
        table=harness.table(["epoch from", "samples/s", "CPU ms/sample"], rows),
        speedup=show(result["speedup"]),
        target=TARGET,
        verdict=harness.verdict(result["speedup"]["met"]),
    )


def summary(result: dict) -> list[list[str]]:
    met = result["speedup"]["met"]
    return [["Stage II epoch, cached features / on the fly", show(result["speedup"]), f">= {TARGET}",
             "yes" if met else "**no**"]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip_shards", type=Path, nargs="?", help="clip shards with a manifest (default: synthetic)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CLIPS} clips, 2 rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emi-bench-stage2-") as tmp:
        print(section(run(Path(tmp), quick=args.quick, clip_shards=args.clip_shards)))


if __name__ == "__main__":
    main()
