"""What the loop does to a stage's model before training it: activation checkpointing and torch.compile.

Both change how the model computes, never what it computes or what its parameters are called: checkpointing goes
through the transformers API of each encoder, and compilation is in place (`nn.Module.compile`), so the state dict,
checkpoints and exports keep the plain names (no `_orig_mod.` prefix) and `--resume` works either way.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from emi.config import TrainSection
from emi.errors import UsageError


def prepare_model(model: nn.Module, train: TrainSection) -> list[str]:
    """Switch on activation checkpointing and compilation in `model` as `train` says; returns what was done,
    for the log."""
    done = []
    if train.activation_checkpointing:
        done.append(f"activation checkpointing in {', '.join(enable_activation_checkpointing(model))}")
    if train.compile:
        regions = compile_regions(model, mode=train.compile_mode, backend=train.compile_backend)
        done.append(f"torch.compile of {regions} regions (mode {train.compile_mode}, {train.compile_backend})")
    return done


def enable_activation_checkpointing(model: nn.Module) -> list[str]:
    """Gradient checkpointing in every transformers encoder of `model` that supports it (CLIP and ViT vision
    towers, BERT, Wav2Vec2 with its convolutional feature encoder); returns their names.

    Non-reentrant checkpointing (torch.utils.checkpoint, use_reentrant=False): it works when a layer's inputs need
    no gradient, under DDP (no parameter reported ready twice), and under ZeRO-3, whose hooks gather the
    parameters again for the recomputation. Dropout masks are recomputed identically (the RNG state is restored).
    """
    enabled = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in enabled):  # inside an encoder done already (DINOv2's)
            continue
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.24
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # the name before (GPU images with an older transformers)
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            enabled.append(name or type(module).__name__)
    if not enabled:
        raise UsageError(
            f"train.activation_checkpointing: {type(model).__name__} has no encoder that supports it "
            "(Stage I's transformers encoders do; set it to false for this model)"
        )
    return enabled


def compile_regions(module: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """torch.compile `module` in place, region by region; returns the number of regions compiled.

    Regional compilation (the torch.compile recipe torchtitan and accelerate use): every block of a repeated stack
    (a ModuleList of one class, e.g. the 24 layers of ViT-L/14) is compiled on its own, so the blocks share one
    compiled graph and compile time does not grow with depth; every other subtree (embeddings, the Wav2Vec2
    feature encoder, projections) is one region. Code between the regions (pooling, the loss) stays eager, and so
    do collectives: DeepSpeed's hooks and the loss's all-gather never sit inside a graph.
    """
    if _is_repeated(module):
        for block in module:
            block.compile(mode=mode, backend=backend)
        return len(module)
    if any(_is_repeated(child) for child in module.modules()):
        return sum(compile_regions(child, mode, backend) for child in module.children())
    if any(True for _ in module.parameters()):
        module.compile(mode=mode, backend=backend)
        return 1
    return 0  # nothing to learn in here (an activation, a dropout): not worth a graph


def _is_repeated(module: nn.Module) -> bool:
    blocks = list(module.children()) if isinstance(module, nn.ModuleList) else []
    return len(blocks) > 1 and len({type(block) for block in blocks}) == 1
