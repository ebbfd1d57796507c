"""GPU Stage I throughput on a synthetic batch held on the device: the ceiling the real loader is measured against.

The model, loss and step are the trainer's own: `emi.stages.stage1.build_model` from configs/stage1/vitl.yaml with
its encoders built from config dicts instead of `pretrained:` names (`RANDOM_INIT`: CLIP ViT-L/14 as
openai/clip-vit-large-patch14, BERT-base, Wav2Vec2-large as facebook/wav2vec2-large-960h-lv60-self; random init,
nothing is downloaded), `emi.engine.prepare.prepare_model` (activation checkpointing, torch.compile),
`build_accelerator` (train.strategy, bf16 on a GPU), the stage's loss (`contrastive_loss`, which normalises the
uint8 frames on the device) and `emi.engine.loop.train_step`. The batch has the loader's layout and sizes (uint8
frames, prompts padded to data.max_text_len, data.audio_seconds of 16 kHz audio) and stays on the GPU: no loading,
no host-to-device copy. Reports samples/s per GPU, peak memory (torch.cuda.max_memory_allocated) and MFU with the
trainer's FLOP count (emi.models.flops) and peak table (emi.engine.telemetry). `--sweep` finds the largest batch
that fits instead. Reference: OpenCLIP trains ViT-L/14 at about 70 samples/s per A100.

    python benchmarks/gpu_stage1.py [--batch-size 128] [--steps 20] [--warmup 5] [--pairs vision_text audio_text]
        [--activation-checkpointing] [--compile] [--strategy zero2|zero3|ddp] [--profile] [--sweep] [--json FILE]
        [--results]                                                  (its section of benchmarks/RESULTS.md)
    torchrun --nproc_per_node 8 benchmarks/gpu_stage1.py ...      (numbers per GPU; negatives from all GPUs)
    python benchmarks/gpu_stage1.py --tiny --steps 2               (CPU smoke test: configs/stage1/tiny.yaml)
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import render
from benchmarks.results import write_section
from emi.config import Stage1Config, load_config
from emi.data import AudioSpec
from emi.engine.distributed import build_accelerator, input_dtype
from emi.engine.optim import build_optimizer
from emi.engine.prepare import prepare_model
from emi.engine.step import train_step
from emi.engine.telemetry import device_name, peak_flops
from emi.stages.stage1 import VA_STD_LABELS, build_model, contrastive_loss, image_spec, train_flops_per_sample

REPO = Path(__file__).resolve().parents[1]
VITL_CONFIG = REPO / "configs" / "stage1" / "vitl.yaml"
TINY_CONFIG = REPO / "configs" / "stage1" / "tiny.yaml"
VIT_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
BERT_BASE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
}
WAV2VEC2_LARGE_LV60 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "conv_bias": True,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "layerdrop": 0.0,
    "mask_time_prob": 0.0,
}
# configs/stage1/vitl.yaml's encoders, built from these architectures with random weights
RANDOM_INIT = {
    "vision": {"arch": "clip", "pretrained": None, "config": VIT_L14},
    "text": {"arch": "bert", "pretrained": None, "config": BERT_BASE},
    "audio": {"arch": "wav2vec2", "pretrained": None, "config": WAV2VEC2_LARGE_LV60},
}
OPENCLIP_VITL14_A100 = 70.0  # samples/s per A100, the reference to beat


def random_init_overrides() -> list[str]:
    """Dotted overrides that turn configs/stage1/vitl.yaml's pretrained encoders into random-init ones."""
    return [f"model.{name}={json.dumps(spec)}" for name, spec in RANDOM_INIT.items()]


def stage1_config(tiny: bool, overrides: list[str] = ()) -> Stage1Config:
    if tiny:
        return load_config(Stage1Config, TINY_CONFIG, list(overrides))
    return load_config(Stage1Config, VITL_CONFIG, [*random_init_overrides(), *overrides])


def synthetic_batch(
    config: Stage1Config, model: Any, batch_size: int, device: torch.device, float_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One batch laid out as the Stage I loader lays it out, on the device."""
    generator = torch.Generator().manual_seed(0)
    text_len = config.data.max_text_len
    input_ids = torch.randint(1000, model.text.config.vocab_size, (batch_size, text_len), generator=generator)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.full((batch_size, len(VA_STD_LABELS)), float("nan")),
        "label_mask": torch.zeros(batch_size, len(VA_STD_LABELS), dtype=torch.bool),
    }
    if model.vision is not None:
        size = model.vision.config.image_size
        batch["pixel_values"] = torch.randint(
            0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator
        )
    if model.audio is not None:
        window = AudioSpec(seconds=config.data.audio_seconds).window
        batch["input_values"] = 0.1 * torch.randn(batch_size, window, generator=generator)
        batch["audio_attention_mask"] = torch.ones(batch_size, window, dtype=torch.long)
    return {
        key: value.to(
            device, float_dtype if float_dtype and value.is_floating_point() and key != "labels" else value.dtype
        )
        for key, value in batch.items()
    }


class Bench:
    """The trainer's model, optimizer and step on one accelerator, ready to run on synthetic batches."""

    def __init__(self, config: Stage1Config) -> None:
        self.config = config
        self.accelerator = build_accelerator(config.train, config.data.batch_size)
        set_seed(config.run.seed)
        model = build_model(config, self.accelerator.device)
        self.train_flops = train_flops_per_sample(model, config)
        self.parameters = sum(p.numel() for p in model.parameters())
        image = image_spec(model)
        prepare_model(model, config.train)
        optimizer = build_optimizer(model, config.optim)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.float_dtype = input_dtype(self.accelerator)
        self.compute_loss = contrastive_loss(config, image, self.float_dtype)
        self.model.train()

    def batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        return synthetic_batch(
            self.config,
            self.accelerator.unwrap_model(self.model),
            batch_size,
            self.accelerator.device,
            self.float_dtype,
        )

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        train_step(self.model, self.optimizer, batch, self.compute_loss, self.accelerator, self.config.train.clip_grad)


def measure(
    bench: Bench,
    batch_size: int,
    steps: int,
    warmup: int,
    profile_steps: bool = False,
    peak_tflops: float | None = None,
    name: str = "",
) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    batch = bench.batch(batch_size)
    for _ in range(warmup):
        bench.step(batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    bench.accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(steps):
        bench.step(batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if profile_steps and bench.accelerator.is_main_process:
        print_profile(lambda: bench.step(batch), cuda)
    samples_per_s = batch_size * steps / seconds
    accelerator, train = bench.accelerator, bench.config.train
    device = device_name(accelerator.device)
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device, accelerator.mixed_precision)
    achieved = bench.train_flops * samples_per_s if bench.train_flops else None
    return {
        "model": name,
        "device": device,
        "world_size": accelerator.num_processes,
        "rank": accelerator.process_index,
        "precision": accelerator.mixed_precision,
        "strategy": train.strategy,
        "batch_size_per_gpu": batch_size,
        "text_len": bench.config.data.max_text_len,
        "audio_seconds": bench.config.data.audio_seconds if bench.accelerator.unwrap_model(bench.model).audio else None,
        "steps": steps,
        "warmup": warmup,
        "activation_checkpointing": train.activation_checkpointing,
        "compile": train.compile,
        "parameters": bench.parameters,
        "seconds": round(seconds, 3),
        "samples_per_s_per_gpu": round(samples_per_s, 2),
        "step_ms": round(1000 * seconds / steps, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "train_gflops_per_sample": round(bench.train_flops / 1e9, 3) if bench.train_flops else None,
        "achieved_tflops_per_gpu": round(achieved / 1e12, 3) if achieved else None,
        "mfu": round(achieved / peak, 4) if achieved and peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
    }


def sweep(bench: Bench, start: int, limit: int, memory_fraction: float = 0.92) -> dict[str, Any]:
    """The largest batch per GPU that trains: batches double from `start` while a linear model of peak memory
    (fitted to the last two batches that ran) predicts they fit in `memory_fraction` of the device's memory; then
    the batch that model predicts for the remaining room. One step each; the first out-of-memory ends the sweep
    (the process's allocator is not to be trusted after it). On the CPU (a dry run) memory is not measured and the
    sweep doubles up to `limit`."""
    cuda = torch.cuda.is_available()
    capacity = torch.cuda.get_device_properties(bench.accelerator.device).total_memory if cuda else None
    tried: list[dict[str, Any]] = []
    batch_size = start
    while batch_size <= limit:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            bench.step(bench.batch(batch_size))
            if cuda:
                torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            tried.append({"batch_size": batch_size, "fits": False, "peak_memory_gib": None})
            break
        peak = torch.cuda.max_memory_allocated() if cuda else None
        tried.append(
            {
                "batch_size": batch_size,
                "fits": True,
                "peak_memory_gib": round(peak / 2**30, 2) if peak is not None else None,
            }
        )
        batch_size = next_batch(tried, capacity, memory_fraction, limit)
        if batch_size is None:
            break
    fitting = [t["batch_size"] for t in tried if t["fits"]]
    return {
        "largest_batch": max(fitting) if fitting else None,
        "tried": tried,
        "device_memory_gib": round(capacity / 2**30, 2) if capacity else None,
    }


def next_batch(tried: list[dict[str, Any]], capacity: int | None, memory_fraction: float, limit: int) -> int | None:
    """The next batch to try after a success (see `sweep`), or None when the last one is as far as it goes."""
    last = tried[-1]["batch_size"]
    if last >= limit:
        return None
    if capacity is None:
        return 2 * last if 2 * last <= limit else None
    fits = [(t["batch_size"], t["peak_memory_gib"] * 2**30) for t in tried if t["fits"]]
    if len(fits) < 2:
        return 2 * last
    (b0, m0), (b1, m1) = fits[-2], fits[-1]
    per_sample = max((m1 - m0) / (b1 - b0), 1.0)
    room = int((memory_fraction * capacity - m1) / per_sample)
    if room >= last:
        return min(2 * last, limit)
    candidate = (last + room) // 8 * 8  # multiples of 8 keep the matrix shapes tensor-core friendly
    return candidate if last < candidate <= limit else None


def model_name(config: Stage1Config, tiny: bool) -> str:
    if tiny:
        return "tiny (configs/stage1/tiny.yaml)"
    encoders = ["ViT-L/14"] if "vision_text" in config.model.pairs else []
    return " + ".join([*encoders, "BERT-base", *(["Wav2Vec2-large"] if "audio_text" in config.model.pairs else [])])


def print_profile(step: Callable[[], None], cuda: bool, steps: int = 3) -> None:
    """Where a step's time goes: the operators with the most device (or CPU) time over a few profiled steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70))


def heading(result: dict[str, Any]) -> str:
    """One section per model, card and setting: a run again replaces its own."""
    return (
        f"GPU: Stage I {result['model']} contrastive pretraining ({result['device']} x {result['world_size']}, "
        f"{result['strategy']}, batch {result['batch_size_per_gpu']}{', compiled' if result['compile'] else ''})"
    )


def section(result: dict[str, Any]) -> str:
    speed = result["samples_per_s_per_gpu"]
    return render(
        "gpu_stage1",
        date=datetime.date.today().isoformat(),
        rows="\n".join(f"| {key} | {value} |" for key, value in result.items() if key != "rank"),
        speed=speed,
        openclip=f"{OPENCLIP_VITL14_A100:.0f}",
        ratio=f"{speed / OPENCLIP_VITL14_A100:.2f}",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per GPU (default 128, --tiny 4); --sweep: the first batch tried (default 16, --tiny 2)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, --tiny 1)")
    parser.add_argument(
        "--pairs",
        nargs="+",
        choices=["vision_text", "audio_text"],
        default=None,
        help="the pairs to train (default: both, as configs/stage1/vitl.yaml)",
    )
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile, regional, in place")
    parser.add_argument("--compile-backend", default="inductor", help="train.compile_backend")
    parser.add_argument(
        "--strategy",
        choices=["zero2", "zero3", "ddp"],
        default="zero2",
        help="ddp on one GPU is plain PyTorch with bf16 autocast: the baseline for DeepSpeed's overhead",
    )
    parser.add_argument("--profile", action="store_true", help="print the operators that take a step's time")
    parser.add_argument("--sweep", action="store_true", help="find the largest batch that fits instead")
    parser.add_argument("--sweep-limit", type=int, default=4096, help="--sweep: the largest batch to try")
    parser.add_argument("--tiny", action="store_true", help="configs/stage1/tiny.yaml (CPU smoke test)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    parser.add_argument("--results", action="store_true", help="write its section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    batch_size = args.batch_size or ((2 if args.tiny else 16) if args.sweep else (4 if args.tiny else 128))
    overrides = [
        f"train.strategy={args.strategy}",
        f"train.activation_checkpointing={args.activation_checkpointing}",
        f"train.compile={args.compile}",
        f"train.compile_backend={args.compile_backend}",
        f"data.batch_size={batch_size}",
    ]
    if args.pairs:
        overrides.append(f"model.pairs={json.dumps(args.pairs)}")
    config = stage1_config(args.tiny, overrides)
    bench = Bench(config)
    name = model_name(config, args.tiny)
    if args.sweep:
        result = {
            "model": name,
            "strategy": args.strategy,
            "rank": bench.accelerator.process_index,
            "activation_checkpointing": args.activation_checkpointing,
            "compile": args.compile,
            **sweep(bench, batch_size, args.sweep_limit),
        }
    else:
        result = measure(
            bench,
            batch_size=batch_size,
            steps=args.steps,
            warmup=args.warmup if args.warmup is not None else (1 if args.tiny else 5),
            profile_steps=args.profile,
            peak_tflops=args.peak_tflops,
            name=name,
        )
    if result["rank"] == 0:
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.results and not args.sweep:
            write_section(heading(result), section(result))


if __name__ == "__main__":
    main()
