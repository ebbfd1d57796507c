"""The models' own names and the checks of their options, without torch: a config is checked here before anything
runs (the stages as they start, `emi.launch` before it queues a job, a sweep before it submits its cells,
`emi config show`), and the models check their arguments here too.

    MODALITIES  the three inputs of Stage II, in the order every [B, 3] mask and weight follows
    FUSIONS     Stage II's fusion kinds (emi.models.fusion registers one class per name)
    PAIRS       Stage I's contrastive pairs
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from emi.errors import UsageError

MODALITIES = ("vision", "audio", "text")
FUSIONS = ("qam", "mean", "concat", "xattn", "late")
PAIRS = ("vision_text", "audio_text")
PAIR_ENCODER = {"vision_text": "vision", "audio_text": "audio"}  # the encoder each pair aligns with text


def check_fusion_options(options: Any) -> None:
    """UsageError naming the `model.` key when a Stage II model section (emi.config.FusionSection) cannot make a
    fusion model."""
    check_modalities(options.modalities, "model.modalities")
    if options.fusion not in FUSIONS:
        raise UsageError(f"model.fusion is {options.fusion!r}; choose one of {list(FUSIONS)}")
    if options.tcn_kernel < 1 or options.tcn_kernel % 2 == 0:
        raise UsageError(f"model.tcn_kernel must be odd (symmetric 'same' padding), got {options.tcn_kernel}")
    if options.transformer_heads < 1 or options.d_model % options.transformer_heads:
        raise UsageError(
            f"model.d_model {options.d_model} is not divisible by model.transformer_heads {options.transformer_heads}"
        )
    if options.num_segments < 1:
        raise UsageError(f"model.num_segments must be at least 1, got {options.num_segments}")
    if not 0.0 <= options.modality_dropout < 1.0:
        raise UsageError(f"model.modality_dropout must be in [0, 1), got {options.modality_dropout}")


def check_modalities(modalities: Sequence[str], key: str) -> None:
    if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= set(MODALITIES):
        raise UsageError(f"{key} must be distinct names from {list(MODALITIES)}, got {list(modalities)}")


def check_contrastive_options(options: Any) -> None:
    """UsageError naming the `model.` key when a Stage I model section (emi.config.ContrastiveSection) names pairs
    it cannot train."""
    if not options.pairs:
        raise UsageError(f"model.pairs must name at least one of {list(PAIRS)}")
    for pair in options.pairs:
        if pair not in PAIRS:
            raise UsageError(f"model.pairs has {pair!r}; choose among {list(PAIRS)}")
        if getattr(options, PAIR_ENCODER[pair]) is None:
            raise UsageError(f"model.pairs has {pair} but model.{PAIR_ENCODER[pair]} is not set")


def check_model_options(config: Any) -> None:
    """The model section of a Stage I or Stage II config (emi.config.Stage1Config or Stage2Config), checked."""
    if hasattr(config.model, "pairs"):
        check_contrastive_options(config.model)
    else:
        check_fusion_options(config.model)
