"""Activation checkpointing and torch.compile change how the model computes, not what or under which names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emi.config import TrainSection
from emi.engine.prepare import compile_regions, enable_activation_checkpointing, prepare_model
from emi.errors import UsageError
from emi.models.encoders import ContrastiveModel

from helpers import BERT_SPEC, CLIP_SPEC, VIT_SPEC, WAV2VEC2_SPEC

NO_DROPOUT = {
    "clip": {"attention_dropout": 0.0},
    "vit": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "wav2vec2": {"hidden_dropout": 0.0, "activation_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0},
}


def without_dropout(spec: dict) -> dict:
    return {**spec, "config": {**spec["config"], **NO_DROPOUT[spec["arch"]]}}


def contrastive(vision_spec: dict, seed: int = 0) -> ContrastiveModel:
    torch.manual_seed(seed)
    return ContrastiveModel(
        without_dropout(vision_spec), without_dropout(BERT_SPEC), without_dropout(WAV2VEC2_SPEC), embed_dim=16
    ).train()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    audio_mask = torch.ones(3, 6000, dtype=torch.long)
    audio_mask[2, 4000:] = 0
    return {
        "pixel_values": torch.randn(3, 3, 64, 64, generator=generator),
        "input_ids": torch.randint(5, 1000, (3, 12), generator=generator),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
        "input_values": torch.randn(3, 6000, generator=generator),
        "audio_attention_mask": audio_mask,
    }


def loss_grads_and_saved(model: ContrastiveModel) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """A loss touching every embedding, the gradients of every parameter, and the elements autograd saved."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(**batch())
        weights = torch.linspace(-1, 1, 16)
        loss = sum((out[name] * weights).sum() * (i + 1) for i, name in enumerate(("image", "text", "audio")))
        loss = loss + out["logit_scale_vision_text"] + 2 * out["logit_scale_audio_text"]
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("vision_spec", [CLIP_SPEC, VIT_SPEC], ids=["clip+bert+wav2vec2", "vit+bert+wav2vec2"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_and_saves_less(vision_spec):
    plain_loss, plain_grads, plain_saved = loss_grads_and_saved(contrastive(vision_spec))
    model = contrastive(vision_spec)
    assert enable_activation_checkpointing(model) == ["text", "vision", "audio"]
    loss, grads, saved = loss_grads_and_saved(model)
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and torch.allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-6), name
    # the layers' inner activations are recomputed in backward instead of kept: Wav2Vec2's convolutions, every
    # transformer layer's attention and MLP
    assert saved < 0.5 * plain_saved, (saved, plain_saved)


def test_a_model_without_a_checkpointable_encoder_is_refused_with_a_reason():
    with pytest.raises(UsageError, match="train.activation_checkpointing: Sequential has no encoder"):
        enable_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def test_compiling_in_place_keeps_names_values_and_outputs():
    reference, model = contrastive(CLIP_SPEC), contrastive(CLIP_SPEC)
    names = list(model.state_dict())
    done = prepare_model(model, TrainSection(compile=True, compile_backend="eager"))
    # every repeated layer on its own (2 per encoder) and every other subtree with parameters as one region
    assert done == ["torch.compile of 23 regions (mode default, eager)"]
    assert list(model.state_dict()) == names and not any("_orig_mod" in name for name in names)
    assert type(model.vision).__name__ == "CLIPVisionModel" and model.text.encoder.layer[0]._compiled_call_impl
    inputs = batch()
    with torch.no_grad():
        expected, got = reference.eval()(**inputs), model.eval()(**inputs)
    for name in ("image", "text", "audio"):
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def test_regions_are_the_blocks_of_repeated_stacks_and_the_other_subtrees():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]), nn.ReLU())
    assert compile_regions(model, backend="eager") == 4  # the first Linear, the three blocks; the ReLU has no weights
    assert [m._compiled_call_impl is not None for m in (model[0], *model[1], model[2])] == [True] * 4 + [False]
