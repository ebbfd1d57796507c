"""The optimizer both stages train with (AdamW with OpenCLIP's parameter groups) and its schedule (SGDR)."""

from __future__ import annotations

import math

import torch

from emi.config import OptimSection
from emi.errors import UsageError


def sgdr_lr(step: int, optim: OptimSection, steps_per_epoch: int) -> float:
    """SGDR (Loshchilov & Hutter), as the paper: eta_min + (eta_max - eta_min)(1 + cos(pi T_cur / T_i)) / 2.

    Stepped per iteration; T_i = restart_epochs * steps_per_epoch; at each restart the learning rate jumps back
    to eta_max while the optimizer state (Adam moments) is kept. Optional linear warmup before the first cycle.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    cycle = max(1, round(optim.restart_epochs * steps_per_epoch))
    t_cur = (step - optim.warmup_steps) % cycle
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * t_cur / cycle))


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings of scale (1-D tensors) and logit scales (OpenCLIP)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    if not decay and not no_decay:
        raise UsageError("the model has no trainable parameters")
    groups = [
        {"params": aligned_order(decay), "weight_decay": optim.weight_decay},
        {"params": aligned_order(no_decay), "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def aligned_order(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The group's tensors with those whose size is not a multiple of 8 elements (16 bytes in bf16) last.

    DeepSpeed ZeRO-1/2 flattens each group into one buffer and views the parameters into it, so a scalar such as a
    logit scale early in a group misaligns every tensor after it; cuBLAS then falls back to slow unaligned kernels
    for the biased matmuls (ViT-L/14 + BERT-base on an H200: 2x the step time, benchmarks/RESULTS.md).
    """
    return sorted(params, key=lambda param: param.numel() % 8 != 0)  # stable: keeps model order otherwise
