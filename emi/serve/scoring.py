"""A checkpoint or ensemble (emi.serve.ensemble) over shards: feature shards read as Stage II training reads them,
or clip shards through the checkpoint's encoders (as `emi features extract` would), every readable clip once, on
one rank or several."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from emi.data import DecodeSpec, LoaderSpec, Sampling, Workers, build_loader, resolve_shards
from emi.data.collect import collect
from emi.devices import default_device
from emi.errors import UsageError
from emi.formats.manifest import Manifest
from emi.models.fusion import present_modalities
from emi.serve.ensemble import Ensemble
from emi.serve.features import clip_features, clip_loader, fusion_batch, load_frozen_encoders
from emi.serve.robustness import check_modalities, corrupted, dropped

log = logging.getLogger(__name__)
MODEL_INPUTS = ("vision", "vision_mask", "audio", "audio_mask", "text", "has_audio", "has_text")


def checkpoint_list(checkpoint: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """`--checkpoint` as a list: one path (a checkpoint or an ensemble folder) or several checkpoints."""
    return [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)


def check_batching(batch_size: int, workers: int) -> None:
    if batch_size < 1 or workers < 0:
        raise UsageError(f"--batch-size must be at least 1 and --workers at least 0, got {batch_size} and {workers}")


def ensemble_predictions(
    ensemble: Ensemble, batch: dict[str, Any], device: torch.device, present: torch.Tensor | None = None
) -> torch.Tensor:
    """[members, B, K] intensities of a Stage II batch (features-loader layout), on the CPU."""
    batch = {name: batch[name].to(device) for name in MODEL_INPUTS}
    return ensemble.predictions(batch, None if present is None else present.to(device))


def check_shards(shards: str, manifest: Manifest, ensemble: Ensemble) -> None:
    """The shards carry the labels the checkpoint predicts, features of its dims; warn where clips were prepared
    or features computed unlike its training data."""
    record, dims = ensemble.record, ensemble.models[0].dims
    missing = [name for name in record.labels if manifest.labels.get(name) != "float"]
    if missing:
        raise UsageError(
            f"{shards}: the shards carry no labels {missing}, which the checkpoint predicts; "
            f"their labels are {sorted(manifest.labels)}"
        )
    if manifest.is_features and manifest.dims != dims:
        raise UsageError(f"{shards}: features of dims {manifest.dims}, the checkpoint expects {dims}")
    if manifest.is_features and manifest.encoders_sha256 not in (None, record.encoders.sha256):
        log.warning(
            "%s: features come from the encoders in %s, not from those the checkpoint was trained with "
            "(copied from %s)",
            shards,
            manifest.encoders,
            record.encoders.source,
        )
    trained, prepared = record.preprocessing.to_dict(), manifest.preprocessing.to_dict()
    differing = {key: (value, prepared[key]) for key, value in trained.items() if prepared[key] != value}
    if differing:
        log.warning(
            "%s: clips prepared unlike the checkpoint's training data (checkpoint, shards): %s", shards, differing
        )


def shard_loader(
    ensemble: Ensemble,
    shard_set,
    manifest: Manifest,
    batch_size: int,
    workers: int,
    device: torch.device,
    world_size: int = 1,
    rank: int = 0,
):
    """(loader, features_of) over feature or clip shards for one rank: features_of(batch) is the Stage II batch the
    fusion models take (clip shards go through the checkpoint's encoders, as `emi features extract` would)."""
    labels, num_frames = ensemble.record.labels, ensemble.record.num_frames
    if manifest.is_features:
        decode = DecodeSpec("features", num_frames=num_frames, label_names=tuple(labels))
        data = build_loader(
            shard_set,
            LoaderSpec(decode, Sampling(batch_size, world_size, rank), Workers(workers, persistent_workers=False)),
        )
        return data, lambda batch: batch
    encoders = load_frozen_encoders(ensemble.encoders(), device)
    data = clip_loader(shard_set, encoders, labels, batch_size, workers, world_size, rank)
    return data, lambda batch: fusion_batch(clip_features(encoders, batch, manifest.preprocessing.fps), num_frames)


def shard_predictions(
    ensemble: Ensemble,
    shards: str,
    batch_size: int = 8,
    workers: int = 1,
    device: torch.device | None = None,
    manifest: str | Path | None = None,
    drop: Sequence[str] = (),
    corrupt: Sequence[str] = (),
    state: PartialState | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
    """(keys, each member's predictions [members, N, K], targets [N, K], clips skipped) of every readable clip of
    feature or clip shards, each clip once; the skipped ones are those the manifest lists that could not be read or
    decoded. Clip shards go through the checkpoint's encoders. `drop`: modalities removed from every clip (as if
    absent); `corrupt`: modalities replaced by noise (emi.serve.robustness). With `state` (a command on several
    ranks) every rank predicts its share and gets everything (every rank must call this)."""
    device = state.device if state is not None else device or default_device()
    world, rank = (state.num_processes, state.process_index) if state is not None else (1, 0)
    check_modalities(drop, corrupt)
    shard_set = resolve_shards(shards, manifest)
    manifest = shard_set.manifest("emi evaluate")
    check_shards(shards, manifest, ensemble)
    data, features_of = shard_loader(ensemble, shard_set, manifest, batch_size, workers, device, world, rank)

    def predict(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        features = corrupted(features_of(batch), corrupt)
        present = dropped(present_modalities(features), drop)
        return {
            "pred": ensemble_predictions(ensemble, features, device, present).transpose(0, 1),
            "labels": batch["labels"].cpu(),
            "label_mask": batch["label_mask"].cpu(),
        }

    keys, out = collect(data, predict, state, device=device)
    for key, row in zip(keys, out["label_mask"]):
        if not row.all():
            absent = [name for name, ok in zip(ensemble.record.labels, row.tolist()) if not ok]
            raise UsageError(f"{shards}: clip {key!r} has no label {absent}")
    skipped = shard_set.num_samples - len(keys)
    if skipped:
        log.warning(
            "%s: evaluated %d clips of %d (unreadable samples were skipped; see warnings above)",
            shards,
            len(keys),
            shard_set.num_samples,
        )
    return keys, out["pred"].transpose(0, 1), out["labels"], skipped
