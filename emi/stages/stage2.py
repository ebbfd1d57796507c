"""Stage II: quality-aware tri-modal fusion on frozen-encoder features (paper Sec. 3.3-3.6).

    accelerate launch [--config_file configs/accelerate/<x>.yaml] -m emi.stages.stage2 \
        --config configs/stage2/<x>.yaml [--resume latest] [section.key=value ...]
    emi train stage2 --config ...                       # one process, or under accelerate launch -m emi.cli
    accelerate launch ... train/stage2.py --config ...   # the script shim, for launchers that want a path

Reads feature shards written by `emi features extract` (or a fold of train + val: `data.folds`, emi.data.folds),
regresses the intensities with a mix of MSE, Pearson and CCC over the global batch (`loss`; with fusion "late" the
same loss also trains each modality's own prediction, weighted by loss.unimodal), keeps an EMA of the
weights for evaluation and export, evaluates the whole val set every epoch (mean Pearson over the emotions, also
with each modality removed) and exports the best model by val mean Pearson to <run>/best/, with the encoders the
features came from (emi.models.fusion_checkpoint.save_fusion), so that `best/` predicts wherever it is copied.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from emi.config import Stage2Config, config_to_dict
from emi.data import DataInfo, DecodeSpec, LoaderSpec, Sampling, ShardSet, build_loader, workers_of
from emi.data.collect import collect
from emi.data.folds import fold_split
from emi.data.urls import feature_shards
from emi.engine import Task, exit_code, run_stage
from emi.engine.distributed import input_dtype
from emi.engine.evaluator import EvalFn
from emi.engine.step import LossFn
from emi.errors import UsageError
from emi.formats.fusion import EncodersRecord, FusionRecord, FusionSpec
from emi.formats.manifest import Manifest
from emi.io import folder_records, records_digest
from emi.metrics import emi_report
from emi.models.fusion import FusionModel, fusion_inputs, present_modalities
from emi.models.fusion_checkpoint import save_fusion
from emi.models.losses import RegressionLoss
from emi.models.options import MODALITIES, check_model_options


def encoder_files(manifest: Manifest, shards: str) -> dict[str, dict]:
    """The files (size, sha256) of the Stage I encoders the features came from, which every export of the run
    carries so that a checkpoint predicts on its own; UsageError when they are gone or changed since extraction."""
    folder = Path(manifest.encoders)
    if not folder.is_dir():
        raise UsageError(
            f"{shards}: the features were extracted with the encoders in {folder}, which are gone; "
            "Stage II copies them into its checkpoints: extract the features again with encoders at hand"
        )
    files = folder_records(folder)
    if manifest.encoders_sha256 is not None and records_digest(files) != manifest.encoders_sha256:
        raise UsageError(
            f"{shards}: the encoders in {folder} changed since these features were extracted with "
            "them; extract the features again"
        )
    return files


def training_shards(config: Stage2Config) -> tuple[ShardSet, ShardSet | None, Manifest]:
    """(train shards, val shards or None, the train shards' manifest): the feature shards data.train and data.val
    name, checked against each other and the labels, or a fold of both (data.folds)."""
    data = config.data
    train_shards, manifest = feature_shards(data.train, data.manifest, "data.train")
    missing = [name for name in config.labels if name not in manifest.labels]
    if missing:
        raise UsageError(f"{data.train}: the features carry no labels {missing}; labels are {sorted(manifest.labels)}")
    val_shards = None
    if data.val:
        val_shards, val_manifest = feature_shards(data.val, data.manifest, "data.val")
        if val_manifest.dims != manifest.dims:
            raise UsageError(
                f"data.val {data.val}: features of dims {val_manifest.dims}, data.train's are "
                f"{manifest.dims}: extract both with the same encoders"
            )
    if data.folds:
        train_shards, val_shards = fold_split(train_shards, val_shards, data.folds, data.fold)
    return train_shards, val_shards, manifest


def regression_loss(config: Stage2Config) -> LossFn:
    """The training loss of a batch: the mix of MSE, Pearson and CCC over the global batch (loss.*); with fusion
    "late" also each modality's own prediction, times loss.unimodal."""
    weights = config_to_dict(config.loss)
    unimodal_weight = weights.pop("unimodal")
    loss = RegressionLoss(weights)
    experts = [index for index, name in enumerate(MODALITIES) if name in config.model.modalities]

    def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**fusion_inputs(batch))
        value, terms = loss(out["pred"], batch["labels"], batch["label_mask"])
        if "experts" in out and unimodal_weight > 0:
            # each modality's own prediction, on the clips where the model saw that modality (the same number
            # of calls on every rank: the loss gathers over the global batch)
            unimodal = sum(
                loss(out["experts"][:, index], batch["labels"], batch["label_mask"] & out["present"][:, index, None])[0]
                for index in experts
            ) / len(experts)
            value = value + unimodal_weight * unimodal
            terms = {**terms, "unimodal": unimodal.detach()}
        return value, terms if len(terms) > 1 else {}

    return compute_loss


def pearson_evaluation(config: Stage2Config, val_data: DataInfo) -> EvalFn:
    """Pearson on the whole val set, each clip once, with all modalities and with each one removed."""
    variants = {"": None, **{f"without_{name}": i for i, name in enumerate(MODALITIES)}}

    def evaluate(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        def predict(batch: dict) -> dict[str, torch.Tensor]:
            present = present_modalities(batch)
            preds = {}
            for name, removed in variants.items():
                kept = present.clone()
                if removed is not None:
                    kept[:, removed] = False
                preds[name] = model(**fusion_inputs(batch, kept))["pred"].float()
            return {"targets": torch.where(batch["label_mask"], batch["labels"], float("nan")).float(), **preds}

        _, gathered = collect(val_data, predict, accelerator, float_dtype=input_dtype(accelerator))
        metrics = {}
        for name in variants:
            report = emi_report(gathered[name], gathered["targets"], config.labels)
            if not name:
                metrics.update({key: value for key, value in report.items() if key.startswith("pearson/")})
                metrics["mse"], metrics["num_samples"] = report["mse"], float(report["num_samples"])
            metrics[f"mean_pearson_{name}" if name else "mean_pearson"] = report["mean_pearson"]
        return metrics

    return evaluate


def build_task(config: Stage2Config, accelerator: Accelerator) -> Task:
    data = config.data
    train_shards, val_shards, manifest = training_shards(config)
    dims = manifest.dims
    record = FusionRecord(
        spec=FusionSpec(
            vision_dim=dims["vision"],
            audio_dim=dims["audio"],
            text_dim=dims["text"],
            num_outputs=len(config.labels),
            options=config.model,
        ),
        labels=list(config.labels),
        encoders=EncodersRecord(str(manifest.encoders), encoder_files(manifest, data.train)),
        preprocessing=manifest.preprocessing,
        num_frames=data.num_frames,
    )
    model = FusionModel(record.spec)

    def loader(shards: ShardSet, train: bool) -> DataInfo:
        decode = DecodeSpec("features", train=train, num_frames=data.num_frames, label_names=tuple(config.labels))
        sampling = Sampling(
            data.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            config.run.seed,
            shuffle=train,
            resampled=data.resampled and train,
            shuffle_buffer=data.shuffle_buffer,
        )
        return build_loader(shards, LoaderSpec(decode, sampling, workers_of(data)))

    def export(state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        save_fusion(folder, state_dict, record, encoders=Path(manifest.encoders))

    val_data = loader(val_shards, train=False) if val_shards is not None else None
    return Task(
        model=model,
        train_data=loader(train_shards, train=True),
        compute_loss=regression_loss(config),
        evaluate=pearson_evaluation(config, val_data) if val_data is not None else None,
        export=export,
        best_metric="mean_pearson" if val_data is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    return exit_code(run_stage(Stage2Config, build_task, argv, __doc__.splitlines()[0], check=check_model_options))


if __name__ == "__main__":
    sys.exit(main())
