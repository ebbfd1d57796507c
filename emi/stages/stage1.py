"""Stage I: CLIP-style vision-text and CLAP-style audio-text contrastive pretraining (paper Sec. 3.3).

    accelerate launch [--config_file configs/accelerate/<x>.yaml] -m emi.stages.stage1 \
        --config configs/stage1/<x>.yaml [--resume latest] [section.key=value ...]
    emi train stage1 --config ...                       # one process, or under accelerate launch -m emi.cli
    accelerate launch ... train/stage1.py --config ...   # the script shim, for launchers that want a path

Also runs under torchrun, srun (one task per GPU) and plain `python` (one process). The loss is the weighted
symmetric InfoNCE of each trained pair over the global batch; the text is the prompt built from the labels.
Exports the encoders to <run>/export/{vision,text,audio}/ (from_pretrained folders) for Stage II.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from emi.config import SourceSection, Stage1Config, Stage1Data, source_names
from emi.data import AudioSpec, DecodeSpec, ImageSpec, LoaderSpec, Mix, Sampling, Source, build_loader, workers_of
from emi.data.collect import collect
from emi.data.decode import normalise
from emi.engine import Task, exit_code, run_stage
from emi.engine.distributed import input_dtype
from emi.engine.step import LossFn
from emi.errors import UsageError
from emi.metrics import retrieval_metrics
from emi.models.encoders import ContrastiveModel, audio_frame_grid, build_tokenizer, export_encoders, image_processing
from emi.models.flops import contrastive_flops
from emi.models.losses import ContrastiveLoss, va_confidence_weights
from emi.models.options import check_model_options
from emi.prompts import build_prompt

# Per-sample spread of the valence/arousal annotations, when the labels carry it (see emi.models.losses).
VA_STD_LABELS = ("Valence_std", "Arousal_std")
PAIR_EMBEDDING = {"vision_text": "image", "audio_text": "audio"}
AUDIO_AUGMENTATION = {"gain_db": (-6.0, 6.0), "snr_db": (10.0, 40.0)}


def data_mode(pairs: list[str]) -> str:
    if set(pairs) == {"vision_text", "audio_text"}:
        return "frame_audio"
    return "frame" if pairs == ["vision_text"] else "audio"


def build_model(config: Stage1Config, device: torch.device | str | None = None) -> ContrastiveModel:
    """The contrastive model, its parameters created on `device` (the device it trains on: random init of ViT-L/14
    and Wav2Vec2-large takes seconds on a GPU and minutes on one CPU core); None: torch's current default."""
    spec = config.model
    # the config guarantees an encoder spec for every listed pair
    vision = vars(spec.vision) if "vision_text" in spec.pairs else None
    audio = vars(spec.audio) if "audio_text" in spec.pairs else None
    with torch.device(device) if device is not None else nullcontext():
        return ContrastiveModel(
            vision, vars(spec.text), audio, spec.embed_dim, spec.init_temperature, spec.max_logit_scale
        )


def image_spec(model: ContrastiveModel) -> ImageSpec:
    if model.vision is None:
        return ImageSpec()
    info = image_processing(model.vision_spec)
    return ImageSpec(info["image_size"], tuple(info["image_mean"]), tuple(info["image_std"]))


def audio_spec(model: ContrastiveModel, config: Stage1Config, train: bool) -> AudioSpec:
    """The audio window at the audio encoder's sampling rate, augmented in training when data.augment says."""
    if model.audio is None:
        return AudioSpec(seconds=config.data.audio_seconds)
    augment = AUDIO_AUGMENTATION if train and config.data.augment else {}
    spec = AudioSpec(sample_rate=model.audio_extractor.sampling_rate, seconds=config.data.audio_seconds, **augment)
    _, stride, max_frames = audio_frame_grid(model.audio, model.audio_extractor)
    if max_frames is not None and not 0 < spec.window <= stride * max_frames:  # Whisper hears fixed windows
        raise UsageError(
            f"data.audio_seconds={config.data.audio_seconds}: the audio encoder "
            f"({type(model.audio).__name__}) hears windows of at most "
            f"{stride * max_frames / spec.sample_rate:g} s; set 0 < data.audio_seconds <= that"
        )
    return spec


def train_flops_per_sample(model: ContrastiveModel, config: Stage1Config) -> float | None:
    """Model FLOPs of one training sample (emi.models.flops); None when the audio window is not fixed, or for an
    arch: auto encoder (emi.models.flops counts clip, vit, bert and wav2vec2)."""
    audio_samples = audio_spec(model, config, train=False).window or None
    if model.audio is not None and audio_samples is None:
        return None
    specs = (spec for spec in (model.vision_spec, model.text_spec, model.audio_spec) if spec is not None)
    if any(spec["arch"] == "auto" for spec in specs):
        return None
    return float(contrastive_flops(model, config.data.max_text_len, audio_samples)["train"])


def model_outputs(
    model: torch.nn.Module, batch: dict, image: ImageSpec, float_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The model on a batch on the device; frames come as uint8 and are normalised here, on the device."""
    pixels = batch.get("pixel_values")
    if pixels is not None:
        pixels = normalise(pixels, image).to(float_dtype or torch.float32)
    return model(
        pixel_values=pixels,
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        input_values=batch.get("input_values"),
        audio_attention_mask=batch.get("audio_attention_mask"),
    )


def contrastive_loss(config: Stage1Config, image: ImageSpec, float_dtype: torch.dtype | None) -> LossFn:
    """The training loss of a batch: each pair's weighted InfoNCE over the global batch, summed."""
    spec = config.model
    contrastive = ContrastiveLoss(local_loss=spec.local_loss, gather_with_grad=spec.gather_with_grad)

    def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model_outputs(model, batch, image, float_dtype)
        va_std = batch["labels"].masked_fill(~batch["label_mask"], float("nan"))
        weights = va_confidence_weights(va_std, va_std.shape[0], spec.va_std_scale)
        losses, temperatures = {}, {}
        for pair in spec.pairs:
            scale = out[f"logit_scale_{pair}"]
            losses[f"loss_{pair}"] = contrastive(out[PAIR_EMBEDDING[pair]], out["text"], scale, weights)
            temperatures[f"temperature_{pair}"] = 1.0 / scale.detach()
        return sum(losses.values()), {**losses, **temperatures}

    return compute_loss


def train_shards(data: Stage1Data) -> str | Mix:
    """data.train, or the Mix of data.sources (or of data.train alone, for data.epoch_samples), each source with
    its name and its prompt families."""
    if data.sources is None and not data.epoch_samples:
        return data.train
    sources = data.sources or [SourceSection(data.train)]
    return Mix(
        tuple(
            Source(name, source.shards, source.weight, partial(build_prompt, families=tuple(source.prompts)))
            if source.prompts is not None
            else Source(name, source.shards, source.weight)
            for name, source in zip(source_names(sources), sources)
        ),
        data.epoch_samples,
    )


def build_task(config: Stage1Config, accelerator: Accelerator) -> Task:
    spec = config.model
    model = build_model(config, accelerator.device)
    tokenizer = build_tokenizer(vars(spec.text))
    image = image_spec(model)
    float_dtype = input_dtype(accelerator)
    data = config.data

    def loader(shards: str | Mix, train: bool):
        decode = DecodeSpec(
            data_mode(spec.pairs),
            train=train and data.augment,
            image=image,
            audio=audio_spec(model, config, train),
            label_names=VA_STD_LABELS,
            prompt_fn=build_prompt,
            tokenizer=tokenizer,
            max_text_len=data.max_text_len,
        )
        # in training, no sample twice in an epoch: a repeat in the global batch is its own false negative
        sampling = Sampling(
            data.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            config.run.seed,
            shuffle=train,
            resampled=data.resampled and train,
            drop_last=train,
            shuffle_buffer=data.shuffle_buffer,
        )
        return build_loader(shards, LoaderSpec(decode, sampling, workers_of(data)), data.manifest)

    train_data = loader(train_shards(data), train=True)
    val_data = loader(data.val, train=False) if data.val else None

    def evaluate(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Retrieval R@1/R@5 in both directions over the whole val set, each sample counted once."""

        def embed(batch: dict) -> dict[str, torch.Tensor]:
            out = model_outputs(model, batch, image, float_dtype)
            return {name: out[name].float() for name in ("image", "audio", "text") if name in out}

        _, gathered = collect(val_data, embed, accelerator, float_dtype=float_dtype)
        metrics = {"num_samples": float(len(gathered["text"]))}
        for pair in spec.pairs:
            recalls = retrieval_metrics(gathered[PAIR_EMBEDDING[pair]], gathered["text"])
            metrics.update({f"{pair}/{name}": value for name, value in recalls.items()})
        return metrics

    def export(state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        export_encoders(model, state_dict, folder, tokenizer)

    return Task(
        model=model,
        train_data=train_data,
        compute_loss=contrastive_loss(config, image, float_dtype),
        evaluate=evaluate if val_data is not None else None,
        export=export,
        train_flops_per_sample=train_flops_per_sample(model, config),
    )


def main(argv: list[str] | None = None) -> int:
    return exit_code(run_stage(Stage1Config, build_task, argv, __doc__.splitlines()[0], check=check_model_options))


if __name__ == "__main__":
    sys.exit(main())
