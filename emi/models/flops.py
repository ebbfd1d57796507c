"""Model FLOPs of Stage I's encoders, counted analytically from their configs: the numerator of MFU.

One multiply-add is 2 FLOPs. Per sample, forward pass:

    transformer encoder, L layers of width d and MLP width f over T tokens:
        L * (2 T (4 d^2 + 2 d f) + 4 T^2 d)
        (Q, K, V and output projections 4 d^2, the MLP 2 d f, per token; attention scores Q K^T and their
        product with V, T^2 d each)
    CLIP / ViT vision tower, image S x S, patch p, C channels: T = (S/p)^2 + 1 tokens (the patches and CLS), and
        the patch embedding, a convolution: 2 (S/p)^2 C p^2 d
    BERT: T = the text length (the loader pads every prompt to data.max_text_len)
    Wav2Vec2 on a waveform of N samples:
        the convolutional feature encoder, layer i of kernel k_i and stride s_i from c_(i-1) to c_i channels
        (c_0 = 1) over n_i = floor((n_(i-1) - k_i) / s_i) + 1 output frames (n_0 = N): 2 n_i k_i c_(i-1) c_i
        the feature projection to the encoder width d over F = n_last frames: 2 F c_last d
        the positional convolution (kernel K, G groups, padding K // 2: F + 1 outputs for even K, F for odd):
        2 (F + 1 - K mod 2) K d^2 / G
        the transformer encoder over T = F frames
    each projection head into the shared space of width e: 2 d e

Not counted: embedding lookups, biases, normalisations, activations, softmax, and the loss (each pair's logits
against the global batch: 4 x global batch x e per sample; for configs/stage1/vitl.yaml's two pairs at a global batch
of 32768, 0.05% of the forward's 397 GFLOP).

A training sample costs 3 x forward: the backward pass computes gradients of the activations and of the weights,
each as much as the forward. Recomputation under activation checkpointing is not counted: these are model FLOPs,
the numerator of MFU as PaLM defines it, not the hardware's FLOPs.
"""

from __future__ import annotations

from typing import Any

TRAIN_FACTOR = 3  # forward + backward


def transformer_flops(layers: int, width: int, mlp_width: int, tokens: int) -> int:
    return layers * (2 * tokens * (4 * width**2 + 2 * width * mlp_width) + 4 * tokens**2 * width)


def vision_flops(config: Any) -> int:
    """A CLIP or ViT vision tower on one image (CLIPVisionConfig or ViTConfig)."""
    patches = (config.image_size // config.patch_size) ** 2
    patch_embedding = 2 * patches * config.num_channels * config.patch_size**2 * config.hidden_size
    return patch_embedding + transformer_flops(
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, patches + 1
    )


def text_flops(config: Any, text_len: int) -> int:
    """BERT on `text_len` tokens."""
    return transformer_flops(config.num_hidden_layers, config.hidden_size, config.intermediate_size, text_len)


def audio_flops(config: Any, samples: int) -> int:
    """Wav2Vec2 on a waveform of `samples` samples (Wav2Vec2Config)."""
    flops, frames, channels = 0, samples, 1
    for out_channels, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        frames = (frames - kernel) // stride + 1
        flops += 2 * frames * kernel * channels * out_channels
        channels = out_channels
    width, kernel, groups = config.hidden_size, config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    flops += 2 * frames * channels * width  # feature projection
    flops += 2 * (frames + 1 - kernel % 2) * kernel * width * width // groups  # positional convolution
    return flops + transformer_flops(config.num_hidden_layers, width, config.intermediate_size, frames)


def contrastive_flops(model: Any, text_len: int, audio_samples: int | None) -> dict[str, int]:
    """Forward FLOPs of one sample through an emi.models.encoders.ContrastiveModel: each encoder the model has with
    its projection head, "forward" their sum and "train" = 3 x forward. `audio_samples`: the waveform length
    (data.audio_seconds x 16000); None when the audio encoder sees no fixed length (then no count)."""
    embed_dim = model.text_projection.out_features
    flops = {"text": text_flops(model.text.config, text_len) + 2 * model.text.config.hidden_size * embed_dim}
    if model.vision is not None:
        flops["vision"] = vision_flops(model.vision.config) + 2 * model.vision.config.hidden_size * embed_dim
    if model.audio is not None:
        if audio_samples is None:
            raise ValueError("the audio encoder's FLOPs need a fixed waveform length")
        flops["audio"] = audio_flops(model.audio.config, audio_samples) + 2 * model.audio.config.hidden_size * embed_dim
    flops["forward"] = sum(flops.values())
    flops["train"] = TRAIN_FACTOR * flops["forward"]
    return flops
