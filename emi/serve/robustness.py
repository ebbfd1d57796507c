"""Robustness: a modality removed from every clip (`--drop`), or replaced by noise of its own scale (`--corrupt`),
and how much a quality-aware model trusts each modality clip by clip (`modality_weights`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from emi.data import DecodeSpec, LoaderSpec, Sampling, build_loader
from emi.data.collect import collect
from emi.devices import default_device
from emi.errors import UsageError
from emi.models.fusion import fusion_inputs
from emi.models.fusion_checkpoint import load_fusion
from emi.models.options import MODALITIES


def check_modalities(drop: Sequence[str], corrupt: Sequence[str]) -> None:
    for name in (*drop, *corrupt):
        if name not in MODALITIES:
            raise UsageError(f"--drop and --corrupt take modalities among {list(MODALITIES)}, got {name!r}")
    both = sorted(set(drop) & set(corrupt))
    if both:
        raise UsageError(f"{both}: a modality is either dropped or corrupted, not both")


def dropped(present: torch.Tensor, modalities: Sequence[str]) -> torch.Tensor:
    """The [B, 3] mask of present modalities with `modalities` removed from every clip."""
    present = present.clone()
    present[:, [MODALITIES.index(name) for name in modalities]] = False
    return present


def corrupted(batch: dict[str, Any], modalities: Sequence[str]) -> dict[str, Any]:
    """The batch with each modality in `modalities` replaced by noise, clip by clip: Gaussian values with the mean
    and standard deviation of that clip's own valid features of the modality (all frames and dimensions), drawn
    from a seed made of the clip key and the modality, so a clip gets the same noise in any batch or run. The
    noise keeps the features' scale and carries nothing of the clip."""
    batch = dict(batch)
    for name in modalities:
        values = batch[name].clone()
        valid = (
            batch[f"{name}_mask"]
            if name != "text"
            else torch.ones(values.shape[:1], dtype=torch.bool, device=values.device)[:, None]
        )
        rows = values if name != "text" else values[:, None, :]
        for index, key in enumerate(batch["key"]):
            clip = rows[index][valid[index]]
            if clip.numel() == 0:
                continue
            seed = int(hashlib.sha256(f"{key}/{name}".encode()).hexdigest()[:15], 16)
            noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            std, mean = torch.std_mean(clip.float(), unbiased=False)
            rows[index][valid[index]] = (mean + std * noise.to(clip.device)).to(clip.dtype)
        batch[name] = values
    return batch


def modality_weights(checkpoint: str | Path, shards: str, batch_size: int = 8) -> dict[str, list[float]]:
    """How much the fusion trusted each modality for each clip of feature shards: {key: [vision, audio, text]},
    the fusion weights (the quality-aware betas, or equal weights for mean fusion) averaged over the segments (for
    late fusion: the weights of the modalities' predictions averaged over the emotions). Absent modalities weigh 0.
    Concatenation fusion has no such weights (UsageError)."""
    device = default_device()
    model, record = load_fusion(checkpoint, device)
    if record.spec.options.fusion == "concat":
        raise UsageError(f"{checkpoint}: concatenation fusion has no per-modality weights")
    decode = DecodeSpec("features", num_frames=record.num_frames, label_names=tuple(record.labels))
    data = build_loader(shards, LoaderSpec(decode, Sampling(batch_size)))
    keys, out = collect(data, lambda batch: {"betas": model(**fusion_inputs(batch))["weights"].mean(1)}, device=device)
    return dict(zip(keys, out["betas"].tolist()))


def mean_weight(weights: dict[str, list[float]], keys: Sequence[str], modality: str) -> float:
    """A modality's mean weight over the clips `keys` (of `modality_weights`)."""
    index = MODALITIES.index(modality)
    return sum(weights[key][index] for key in keys) / len(keys)
