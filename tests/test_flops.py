"""The analytic FLOP count of emi.models.flops, against a count by hand and against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from emi.models.encoders import ContrastiveModel
from emi.models.flops import contrastive_flops

LAYER = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = {**LAYER, "image_size": 16, "patch_size": 8}
TEXT = {**LAYER, "max_position_embeddings": 16}
AUDIO = {
    **LAYER,
    "conv_dim": [4, 4],
    "conv_kernel": [10, 3],
    "conv_stride": [5, 2],
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "mask_time_prob": 0.0,
    "layerdrop": 0.0,
}
TEXT_LEN, AUDIO_SAMPLES, EMBED = 6, 400, 4


def tiny(vision_arch: str) -> ContrastiveModel:
    return ContrastiveModel(
        {"arch": vision_arch, "config": VISION},
        {"arch": "bert", "config": TEXT},
        {"arch": "wav2vec2", "config": AUDIO},
        embed_dim=EMBED,
    ).eval()


def test_the_count_of_a_tiny_model_by_hand():
    # A transformer layer of width d = 8, MLP width f = 16 over T tokens: 2 T (4 d^2 + 2 d f) + 4 T^2 d
    # = 1024 T + 32 T^2. Each projection head: 2 d e = 2 * 8 * 4 = 64.
    # vision: 16 px image, 8 px patches: 4 patches, T = 5. Patch embedding 2 * 4 * (3 * 8 * 8) * 8 = 12288;
    #   layer 1024 * 5 + 32 * 25 = 5920; head 64: 18272
    # text: T = 6: layer 1024 * 6 + 32 * 36 = 7296; head 64: 7360
    # audio, 400 samples: conv 1 (kernel 10, stride 5, 1 -> 4 channels): (400 - 10) // 5 + 1 = 79 frames,
    #   2 * 79 * 10 * 1 * 4 = 6320; conv 2 (kernel 3, stride 2, 4 -> 4): (79 - 3) // 2 + 1 = 39 frames,
    #   2 * 39 * 3 * 4 * 4 = 3744; feature projection 2 * 39 * 4 * 8 = 2496; positional convolution (kernel 4,
    #   even: 40 outputs; 2 groups) 2 * 40 * 4 * 8 * 8 / 2 = 10240; layer, T = 39: 1024 * 39 + 32 * 39^2 = 88608;
    #   head 64: 111472
    expected = {"vision": 18272, "text": 7360, "audio": 111472, "forward": 137104, "train": 3 * 137104}
    for arch in ("clip", "vit"):
        assert contrastive_flops(tiny(arch), TEXT_LEN, AUDIO_SAMPLES) == expected


@pytest.mark.parametrize("arch", ["clip", "vit"])
def test_the_count_equals_torchs_flop_counter(arch):
    model = tiny(arch)
    flops = contrastive_flops(model, TEXT_LEN, AUDIO_SAMPLES)
    # the math attention kernel runs as matrix products, which the counter sees on every device
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(
            pixel_values=torch.randn(3, 3, 16, 16),
            input_ids=torch.randint(0, 1000, (3, TEXT_LEN)),
            input_values=torch.randn(3, AUDIO_SAMPLES),
        )
    assert counter.get_total_flops() == 3 * flops["forward"]  # a batch of 3


def test_the_audio_count_needs_a_fixed_waveform_length():
    with pytest.raises(ValueError, match="fixed waveform length"):
        contrastive_flops(tiny("clip"), TEXT_LEN, None)
