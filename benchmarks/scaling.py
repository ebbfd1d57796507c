"""Stage I past one GPU, on paper: the step time and scaling efficiency of configs/stage1/vitl.yaml's model on 8, 64
and 512 GPUs under ZeRO-2 and ZeRO-3, from a single-GPU step time and the communication a step needs. Writes
benchmarks/SCALING.md (formulas, every assumption, and where ZeRO-3 and the loss's embedding gather stop scaling).

The communication is counted, not assumed: the trainer's own step (gpu_stage1.Bench: build_model, prepare_model,
build_accelerator with DeepSpeed ZeRO-2 or ZeRO-3, contrastive_loss, train_step) runs on 2 CPU ranks (gloo) with the
tiny config while every torch.distributed collective is recorded with its payload and the code that called it:
gradient reduction, parameter all-gather, the contrastive loss's embedding all-gather (forward and backward), small
all-reduces (norms, flags). The counts per parameter and per embedding are carried over to the vitl model, whose
parameters are counted on the meta device.

    python -m benchmarks.scaling [--e2e OUT/e2e.json] [--out benchmarks/SCALING.md]

Section 5 (resuming on another number of processes) is benchmarks/scaling_resize.py's; a run here keeps it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import table  # noqa: E402
from benchmarks.results import sections  # noqa: E402

SCALING = REPO / "benchmarks" / "SCALING.md"
COUNT_BATCH, COUNT_STEPS = 4, 2
BYTES_PER_ELEMENT = 2  # bf16: DeepSpeed communicates gradients and parameters in the training precision
# The links (stated assumptions; override on the command line). Per GPU, one direction, what NCCL reaches.
NVLINK_GBPS = 360.0  # H100/H200 SXM, NVLink 4 (450 GB/s per direction); NCCL's reduce-scatter/all-gather bus bandwidth
NETWORK_GBPS = 45.0  # 400 Gb/s (50 GB/s) per GPU between nodes, one NIC per GPU (rail-optimised, as a DGX H100)
NVLINK_LATENCY_US, NETWORK_LATENCY_US = 3.0, 8.0  # per ring step
GPUS_PER_NODE = 8
SIZES = (8, 64, 512)
# What the payload of each collective is: the full buffer the operation is defined over (elements). On gloo the
# backward of the loss's autograd all-gather runs as one scatter per rank: their outputs add up to the reduce-scatter
# NCCL runs.
PAYLOAD = {
    "all_reduce": "tensor",
    "reduce": "tensor",
    "broadcast": "tensor",
    "reduce_scatter_tensor": "input",
    "_reduce_scatter_base": "input",
    "reduce_scatter": "input_list",
    "all_gather_into_tensor": "output_tensor",
    "_all_gather_base": "output_tensor",
    "all_gather": "tensor_list",
    "all_to_all": "input_tensor_list",
    "all_to_all_single": "input",
    "scatter": "tensor",
}
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter")
# What a ring sends per rank for a payload S on N ranks, in units of (N-1)/N x S: an all-reduce is a reduce-scatter
# followed by an all-gather.
WIRE_FACTOR = {"all_reduce": 2.0}


# ------------------------------------------------------------------------------------------------ counting


class CollectiveCounter:
    """Wraps torch.distributed's collectives (before DeepSpeed binds them) and records, while `active`, each call's
    name, payload in elements and category."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, str]] = []
        self.active = False

    def install(self) -> None:
        import torch.distributed as dist

        for name in PAYLOAD:
            function = getattr(dist, name, None)
            if function is not None:
                setattr(dist, name, self._counted(name, function))

    def _counted(self, name: str, function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def counted(*args, **kwargs):
            if self.active:
                value = signature.bind(*args, **kwargs).arguments[PAYLOAD[name]]
                elements = sum(t.numel() for t in value) if isinstance(value, (list, tuple)) else value.numel()
                self.records.append((name, elements, category(name, elements)))
            return function(*args, **kwargs)

        return counted


def category(name: str, elements: int) -> str:
    files = [frame.filename for frame in traceback.extract_stack()]
    if any(
        f.endswith(os.path.join("emi", "losses.py"))
        or f.endswith(os.path.join("nn", "functional.py"))
        and "distributed" in f
        for f in files
    ):
        return "loss embeddings"
    if elements < 1024 or name == "broadcast":
        return "small collectives"  # norms, overflow flags, ZeRO-3's bookkeeping
    return "gradients" if name in REDUCTIONS else "parameters"


def count(strategy: str, result: Path) -> None:
    """In each of 2 ranks (under accelerate launch): one warm-up step, then COUNT_STEPS counted steps."""
    counter = CollectiveCounter()
    counter.install()
    from benchmarks.gpu_stage1 import Bench, stage1_config

    overrides = [f"train.strategy={strategy}", f"data.batch_size={COUNT_BATCH}"]
    with tempfile.TemporaryDirectory() as tmp:
        if strategy == "zero3":  # gather every tensor, as the vitl model's (the tiny ones are below the threshold)
            config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            (Path(tmp) / "zero3.json").write_text(json.dumps(config))
            overrides.append(f"train.deepspeed_config={Path(tmp) / 'zero3.json'}")
        bench = Bench(stage1_config(tiny=True, overrides=overrides))
        batch = bench.batch(COUNT_BATCH)
        bench.step(batch)
        counter.active = True
        for _ in range(COUNT_STEPS):
            bench.step(batch)
        counter.active = False
    model = bench.accelerator.unwrap_model(bench.model)
    world = bench.accelerator.num_processes
    if bench.accelerator.is_main_process:
        summary: dict[str, dict[str, Any]] = {}
        for name, elements, kind in counter.records:
            entry = summary.setdefault(kind, {"elements_per_step": 0, "calls_per_step": 0, "operations": {}})
            entry["elements_per_step"] += elements / COUNT_STEPS
            # gloo emulates a reduce-scatter with one scatter per rank: count it as the one collective NCCL runs
            entry["calls_per_step"] += (1 / world if name == "scatter" else 1) / COUNT_STEPS
            entry["operations"][name] = entry["operations"].get(name, 0) + elements / COUNT_STEPS
        result.write_text(
            json.dumps(
                {
                    "strategy": strategy,
                    "world_size": bench.accelerator.num_processes,
                    "batch_size": COUNT_BATCH,
                    "parameters": bench.parameters,
                    "embed_dim": model.text_projection.out_features,
                    "collectives": summary,
                },
                indent=2,
            )
        )


def counted(strategy: str, work: Path) -> dict[str, Any]:
    result = work / f"count-{strategy}.json"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / "cpu.yaml"),
        "--num_processes",
        "2",
        "-m",
        "benchmarks.scaling",
        "--count",
        strategy,
        "--result",
        str(result),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"counting {strategy} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------------ the model


def vitl_model() -> dict[str, Any]:
    """The vitl model's sizes, counted on the meta device: parameters, what ZeRO-3 partitions, the embedding width,
    the pairs (embeddings gathered per step: each pair gathers its own embedding and the text's)."""
    import torch

    from benchmarks.gpu_stage1 import stage1_config
    from emi.stages.stage1 import build_model, train_flops_per_sample

    config = stage1_config(tiny=False)
    with torch.device("meta"):
        model = build_model(config)
    zero3 = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())["zero_optimization"]
    threshold = zero3["stage3_param_persistence_threshold"]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "persistence_threshold": threshold,
        "partitioned_parameters": sum(p.numel() for p in model.parameters() if p.numel() >= threshold),
        "embed_dim": model.text_projection.out_features,
        "pairs": len(config.model.pairs),
        "train_flops_per_sample": train_flops_per_sample(model, config),
    }


def buckets(strategy: str, kind: str, elements: float) -> int:
    """How many collectives DeepSpeed cuts `elements` into, with the shipped configs' bucket sizes: gradients by
    reduce_bucket_size, parameters by allgather_bucket_size (ZeRO-2) or stage3_prefetch_bucket_size (ZeRO-3)."""
    zero = json.loads((REPO / "configs" / "deepspeed" / f"{strategy}.json").read_text())["zero_optimization"]
    size = {
        "gradients": "reduce_bucket_size",
        "parameters": "stage3_prefetch_bucket_size" if strategy == "zero3" else "allgather_bucket_size",
    }[kind]
    return max(1, math.ceil(elements / zero[size]))


def coefficients(counts: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per category: its payload per step in units of the model (gradients and parameters: per parameter; loss
    embeddings: per N x B x e), the ring volume per unit of payload (WIRE_FACTOR), and the calls per step."""
    units = {
        "gradients": counts["parameters"],
        "parameters": counts["parameters"],
        "loss embeddings": counts["world_size"] * counts["batch_size"] * counts["embed_dim"],
        "small collectives": 1,
    }
    result = {}
    for kind, unit in units.items():
        entry = counts["collectives"].get(kind, {"elements_per_step": 0.0, "calls_per_step": 0.0, "operations": {}})
        elements = entry["elements_per_step"]
        wire = sum(WIRE_FACTOR.get(op, 1.0) * value for op, value in entry["operations"].items())
        result[kind] = {
            "per_unit": elements / unit,
            "wire": wire / elements if elements else 1.0,
            "calls": entry["calls_per_step"],
        }
    return result


def link(gpus: int, nvlink_gbps: float, network_gbps: float) -> tuple[float, float]:
    """(bytes/s per GPU, seconds per ring step) of the slowest link a collective over `gpus` GPUs crosses."""
    if gpus <= GPUS_PER_NODE:
        return nvlink_gbps * 1e9, NVLINK_LATENCY_US * 1e-6
    return network_gbps * 1e9, NETWORK_LATENCY_US * 1e-6


def predict(
    strategy: str,
    coeff: dict[str, dict[str, float]],
    counts: dict[str, Any],
    model: dict[str, Any],
    gpus: int,
    step_s: float,
    batch: int,
    nvlink_gbps: float,
    network_gbps: float,
) -> dict[str, float]:
    """Seconds per step on `gpus` GPUs (weak scaling: `batch` per GPU): each collective as a ring (the wire volume
    (N-1)/N x payload x wire factor over the bandwidth, and N-1 ring steps of latency), small collectives as trees
    (log2 N steps). Calls scale with the buckets DeepSpeed cuts the vitl model into."""
    bandwidth, latency = link(gpus, nvlink_gbps, network_gbps)
    ring = (gpus - 1) / gpus
    gathered = model["partitioned_parameters"] if strategy == "zero3" else model["parameters"]
    payload = {
        "gradients": coeff["gradients"]["per_unit"] * model["parameters"],
        "parameters": coeff["parameters"]["per_unit"] * gathered,
        "loss embeddings": coeff["loss embeddings"]["per_unit"] * gpus * batch * model["embed_dim"],
    }
    tiny = counts["parameters"]
    calls = {
        kind: coeff[kind]["calls"] * buckets(strategy, kind, payload[kind]) / buckets(strategy, kind, tiny)
        for kind in ("gradients", "parameters")
    }
    calls["loss embeddings"] = coeff["loss embeddings"]["calls"]
    seconds = {
        kind: ring * coeff[kind]["wire"] * payload[kind] * BYTES_PER_ELEMENT / bandwidth
        + calls[kind] * (gpus - 1) * latency
        for kind in payload
    }
    seconds["small collectives"] = coeff["small collectives"]["calls"] * math.ceil(math.log2(gpus)) * latency
    gradient_s, parameter_s = seconds["gradients"], seconds["parameters"]
    rest = seconds["loss embeddings"] + seconds["small collectives"]
    if strategy == "zero3":  # gathers prefetched during forward, reductions during backward
        overlapped = max(step_s, parameter_s + gradient_s) + rest
    else:  # reductions during backward (overlap_comm); the gather of the updated partitions after the step
        overlapped = step_s + max(0.0, gradient_s - step_s * 2 / 3) + parameter_s + rest
    serial = step_s + sum(seconds.values())
    wire_bytes = sum(ring * coeff[kind]["wire"] * payload[kind] * BYTES_PER_ELEMENT for kind in payload)
    return {
        **{f"{kind} s": value for kind, value in seconds.items()},
        "calls": sum(calls.values()),
        "step_s": overlapped,
        "efficiency": step_s / overlapped,
        "step_s_no_overlap": serial,
        "efficiency_no_overlap": step_s / serial,
        "bytes_per_gpu": wire_bytes,
    }


def single_gpu_step(e2e: Path | None, model: dict[str, Any]) -> dict[str, Any]:
    """The measured single-GPU step (the best zero2 trainer run of a gpu_e2e report), or an estimate from the last
    measured MFU when there is none."""
    if e2e is not None:
        report = json.loads(e2e.read_text())
        runs = [
            run
            for run in report["runs"].values()
            if run["strategy"] == "zero2" and run["real"].get("step_s") and not run["checkpointing"]
        ]
        if runs:
            best = max(runs, key=lambda run: run["real"]["samples_per_s"])
            return {
                "step_s": best["real"]["step_s"],
                "batch": best["batch_size"],
                "source": f"measured: {best['name']} in {e2e} ({report['environment']['device']})",
            }
    batch, mfu, peak = 256, 0.359, 989e12
    step = model["train_flops_per_sample"] * batch / (mfu * peak)
    return {
        "step_s": step,
        "batch": batch,
        "source": f"estimated: {model['train_flops_per_sample'] / 1e12:.3f} TFLOP per sample x {batch} at MFU "
        f"{mfu} (compiled ZeRO-2, ViT-L/14 + BERT-base, batch 256, measured on an H200, "
        f"benchmarks/RESULTS.md) of {peak / 1e12:.0f} TFLOP/s; no end-to-end measurement given",
    }


def break_even(
    strategy: str,
    coeff: dict[str, dict[str, float]],
    counts: dict[str, Any],
    model: dict[str, Any],
    step_s: float,
    batch: int,
    network_gbps: float,
) -> dict[str, float]:
    """GPU counts (across nodes) where the latency of a strategy's collectives alone fills the compute time, and
    where the loss's embedding traffic reaches 10% of it."""
    calls = predict(strategy, coeff, counts, model, 2 * GPUS_PER_NODE, step_s, batch, NVLINK_GBPS, network_gbps)[
        "calls"
    ]
    latency_bound = 1 + step_s / (calls * NETWORK_LATENCY_US * 1e-6)
    loss = coeff["loss embeddings"]
    per_gpu = loss["wire"] * loss["per_unit"] * batch * model["embed_dim"] * BYTES_PER_ELEMENT  # x (N - 1) per step
    return {
        "calls": calls,
        "latency_bound_gpus": latency_bound,
        "loss_10_percent_gpus": 1 + 0.1 * step_s * network_gbps * 1e9 / per_gpu,
    }


# ------------------------------------------------------------------------------------------------ the document


def document(
    counts: dict[str, dict[str, Any]], model: dict[str, Any], single: dict[str, Any], nvlink: float, network: float
) -> str:
    step_s, batch = single["step_s"], single["batch"]
    coeff = {strategy: coefficients(result) for strategy, result in counts.items()}
    zero3 = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())["zero_optimization"]
    lines = [
        "# Scaling Stage I past one GPU",
        "",
        f"Written by `python -m benchmarks.scaling` on {datetime.date.today().isoformat()}. A model on paper: the "
        "step time of configs/stage1/vitl.yaml's ViT-L/14 + BERT-base + Wav2Vec2-large on 8, 64 and 512 GPUs "
        "(weak scaling: the batch per GPU stays) from a single-GPU step and the bytes a step moves, counted on 2 "
        "CPU ranks. Not a measurement of many GPUs: nothing here ran on more than one.",
        "",
        "## 1. What one step communicates (counted)",
        "",
        "The trainer's step (`gpu_stage1.Bench`: build_model, prepare_model, DeepSpeed through build_accelerator with "
        "the shipped configs/deepspeed/*.json, contrastive_loss, train_step) on 2 gloo ranks with configs/stage1/"
        f"tiny.yaml ({counts['zero2']['parameters']:,} parameters), batch {COUNT_BATCH} per rank, {COUNT_STEPS} steps "
        "after a warm-up step; every torch.distributed collective recorded with its payload (the whole buffer the "
        "operation is defined over) and its caller. ZeRO-3 runs with stage3_param_persistence_threshold 0, so that "
        "every tensor is partitioned as the vitl model's large ones are (the tiny ones are all below the shipped "
        "threshold).",
        "",
    ]
    rows = []
    for strategy, result in counts.items():
        for kind, entry in sorted(result["collectives"].items()):
            operations = ", ".join(f"{op} {value:,.0f}" for op, value in entry["operations"].items())
            rows.append(
                [strategy, kind, operations, f"{entry['elements_per_step']:,.0f}", f"{entry['calls_per_step']:g}"]
            )
    lines += [
        table(["strategy", "what", "elements per operation (gloo)", "elements per step", "calls per step"], rows),
        "",
    ]
    lines += [
        table(
            [
                "strategy",
                "gradients (x P)",
                "parameters gathered (x P)",
                "loss embeddings (x N B e)",
                "wire factor: gradients, parameters, loss",
            ],
            [
                [
                    strategy,
                    f"{c['gradients']['per_unit']:.3f}",
                    f"{c['parameters']['per_unit']:.3f}",
                    f"{c['loss embeddings']['per_unit']:.3f}",
                    f"{c['gradients']['wire']:g}, {c['parameters']['wire']:g}, {c['loss embeddings']['wire']:g}",
                ]
                for strategy, c in coeff.items()
            ],
        ),
        "",
    ]
    c2, c3 = coeff["zero2"], coeff["zero3"]
    lines += [
        f"Reading (P parameters, N ranks, B samples per rank, e = embedding width): ZeRO-2 all-reduces every gradient "
        f"({c2['gradients']['per_unit']:.2f} P; DeepSpeed 0.19's default use_multi_rank_bucket_allreduce sends "
        "buckets as all-reduces, twice a reduce-scatter's volume on a ring) and gathers the updated parameters once "
        f"after the optimizer step ({c2['parameters']['per_unit']:.2f} P). ZeRO-3 reduce-scatters the gradients "
        f"({c3['gradients']['per_unit']:.2f} P) and gathers the parameters once per step "
        f"({c3['parameters']['per_unit']:.2f} P), not twice: with stage3_max_live_parameters and "
        f"stage3_max_reuse_distance at {zero3.get('stage3_max_live_parameters', 1e9):.0e} (DeepSpeed's defaults), "
        "parameters gathered for the forward stay for the backward as long as the model has fewer parameters than "
        f"that, which the vitl model ({model['parameters'] / 1e6:.0f} M) has. The contrastive loss gathers, per "
        "pair, its embeddings and the text's (forward), and sends their gradients back (backward; on gloo as "
        f"scatters): {c2['loss embeddings']['per_unit']:.2f} x N B e elements per step (with the pairs' "
        "confidence weights), the one volume that grows with N.",
        "",
        "## 2. The model",
        "",
        f"- vitl model (meta device): P = {model['parameters'] / 1e6:.1f} M parameters, ZeRO-3 partitions "
        f"{model['partitioned_parameters'] / 1e6:.1f} M of them (tensors of at least "
        f"{model['persistence_threshold']:,} elements); e = {model['embed_dim']}; {model['pairs']} pairs; "
        f"{model['train_flops_per_sample'] / 1e12:.3f} TFLOP per training sample (emi.models.flops).",
        f"- single-GPU step t_c = {step_s:.3f} s at B = {batch} per GPU ({single['source']}).",
        f"- payloads in bf16 ({BYTES_PER_ELEMENT} bytes per element): DeepSpeed reduces and gathers in the training "
        "precision; the tiny counts (fp32 on the CPU) are taken in elements.",
        "- calls: the counted calls per step, times the buckets DeepSpeed cuts the vitl model into (reduce_bucket_size "
        "for gradients, ZeRO-3's prefetch buckets for parameters: the shipped configs' sizes) over the tiny model's.",
        f"- links: up to {GPUS_PER_NODE} GPUs in a node over NVLink at {nvlink:g} GB/s per GPU and "
        f"{NVLINK_LATENCY_US:g} us per ring step; beyond, 400 Gb/s per GPU between nodes (one NIC per GPU, "
        f"rail-optimised, as a DGX H100) at {network:g} GB/s achieved and {NETWORK_LATENCY_US:g} us per ring step; a "
        "ring over several nodes runs at the network's speed.",
        "- a collective of payload S bytes on N GPUs, as NCCL runs reduce-scatters and all-gathers: a ring, "
        "w x (N-1)/N x S / bandwidth + (N-1) x step latency, w = 2 for an all-reduce, 1 otherwise; small collectives "
        "(norms, flags) as trees: log2(N) x step latency.",
        "- ZeRO-2: t = t_c + max(0, t_gradients - 2/3 t_c) + t_parameters + t_loss + t_small (gradients reduced during "
        "backward, overlap_comm; the updated parameters gathered after the step; the loss's gathers on the critical "
        "path). ZeRO-3: t = max(t_c, t_parameters + t_gradients) + t_loss + t_small (gathers prefetched, reductions "
        "during backward). 'No overlap' adds every term to t_c: the upper bound.",
        "- efficiency = t_c / t (the same samples per GPU per step); the data loader grows with the nodes and is not "
        "in the model; neither are stragglers, the optimizer's own time (inside t_c) or gradient accumulation "
        "(which divides the per-sample communication).",
        "",
        "## 3. Predicted step time and efficiency",
        "",
    ]
    rows = []
    for strategy in ("zero2", "zero3"):
        for gpus in SIZES:
            p = predict(strategy, coeff[strategy], counts[strategy], model, gpus, step_s, batch, nvlink, network)
            rows.append(
                [
                    strategy,
                    gpus,
                    f"{p['bytes_per_gpu'] / 1e9:.2f}",
                    f"{p['gradients s'] * 1e3:.0f}",
                    f"{p['parameters s'] * 1e3:.0f}",
                    f"{p['loss embeddings s'] * 1e3:.1f}",
                    f"{p['calls']:.0f}",
                    f"{p['step_s']:.3f}",
                    f"{p['efficiency']:.2f}",
                    f"{p['step_s_no_overlap']:.3f}",
                    f"{p['efficiency_no_overlap']:.2f}",
                ]
            )
    lines += [
        table(
            [
                "strategy",
                "GPUs",
                "GB sent per GPU per step",
                "gradients ms",
                "parameters ms",
                "loss embeddings ms",
                "collectives",
                "step s",
                "efficiency",
                "step s, no overlap",
                "efficiency, no overlap",
            ],
            rows,
        ),
        "",
    ]
    limit2 = break_even("zero2", coeff["zero2"], counts["zero2"], model, step_s, batch, network)
    limit3 = break_even("zero3", coeff["zero3"], counts["zero3"], model, step_s, batch, network)
    loss_512 = predict("zero2", coeff["zero2"], counts["zero2"], model, 512, step_s, batch, nvlink, network)
    lines += [
        "## 4. Where it stops scaling",
        "",
        "- Bandwidth: neither strategy's parameter or gradient volume per GPU grows with N (rings), so past one node "
        "both settle at the efficiency the 512-GPU rows show: the network's 400 Gb/s against about 3 P (ZeRO-2) or "
        "2 P (ZeRO-3) bf16 elements per step. Inside a node (NVLink) either costs a few percent.",
        f"- Latency: ZeRO-3 runs {limit3['calls']:.0f} collectives per step on the vitl model, ZeRO-2 "
        f"{limit2['calls']:.0f}; each ring takes N-1 steps of {NETWORK_LATENCY_US:g} us. Their latency alone fills the "
        f"compute time at N = {limit3['latency_bound_gpus']:,.0f} (ZeRO-3) and {limit2['latency_bound_gpus']:,.0f} "
        "(ZeRO-2) GPUs: far past 512 with the shipped buckets. ZeRO-3 turns latency-bound much earlier when the "
        "model outgrows stage3_max_live_parameters (or it is lowered to save memory): parameters are then gathered "
        "again before the backward, module by module, hundreds of small rings per step; keeping those gathers in a "
        "node (ZeRO++ hpZ, zero_hpz_partition_size 8, or HSDP) is then the fix.",
        f"- The loss's embedding gather is the one term that grows with N (every GPU receives every other GPU's B x e "
        f"embeddings per pair and sends their gradients back): {loss_512['loss embeddings s'] * 1e3:.1f} ms per "
        f"step at 512 GPUs with B = {batch}, 10% of the compute time at N = {limit2['loss_10_percent_gpus']:,.0f} "
        "GPUs. The text embeddings travel once per pair (emi.models.losses gathers both sides of each pair): "
        "gathering them "
        "once for both pairs would cut this volume by a quarter. Long before that the logits it feeds (B x N B per "
        "pair with model.local_loss) and the global batch "
        "itself are the concern: compute and optimisation, not communication.",
        "",
    ]
    return "\n".join(lines)


def write_document(path: Path, text: str) -> None:
    """Write `text` to `path`, keeping the sections of the file there that it does not have (section 5, which
    benchmarks/scaling_resize.py writes)."""
    earlier = sections(path.read_text()) if path.is_file() else {}
    ours = sections(text)
    kept = [section for heading, section in earlier.items() if heading not in ours]
    path.write_text("\n".join([text.rstrip("\n") + "\n", *kept]).rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e", type=Path, default=None, help="a gpu_e2e.py report (e2e.json): the measured step")
    parser.add_argument("--out", type=Path, default=SCALING)
    parser.add_argument("--nvlink-gbps", type=float, default=NVLINK_GBPS)
    parser.add_argument("--network-gbps", type=float, default=NETWORK_GBPS)
    parser.add_argument("--count", choices=("zero2", "zero3"), help="internal: count one strategy's collectives")
    parser.add_argument("--result", type=Path, help="internal: where --count writes")
    args = parser.parse_args()
    if args.count:
        count(args.count, args.result)
        return
    with tempfile.TemporaryDirectory(prefix="emi-scaling-") as tmp:
        counts = {strategy: counted(strategy, Path(tmp)) for strategy in ("zero2", "zero3")}
    model = vitl_model()
    single = single_gpu_step(args.e2e, model)
    write_document(args.out, document(counts, model, single, args.nvlink_gbps, args.network_gbps))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
