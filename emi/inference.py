"""Using a Stage II checkpoint: `emi evaluate` on shards and `emi predict` on raw video files.

    emi evaluate --checkpoint runs/<stage2>/best --shards data/features/val     # or clip shards
    emi evaluate --checkpoint runs/a/best --checkpoint runs/b/best --shards ... --out report.json  # an ensemble
    emi evaluate --checkpoint runs/<stage2>/best --shards ... --drop audio      # robustness: audio removed
    emi predict --checkpoint runs/<stage2>/best clip1.mp4 clip2.mp4

Every command takes an ensemble (emi.ensemble: several checkpoints, or an ensemble folder; one checkpoint is an
ensemble of one) and averages its members' predictions; evaluate reports each member's score and the ensemble's.

Evaluate reads feature shards as Stage II training reads them, or clip shards through the checkpoint's encoders
(clip_loader -> clip_features -> fusion_batch, as `emi features extract` does), so both give the same numbers up
to the float16 storage of the features. Predict prepares each video as the shard builder did (SampleBuilder with
the checkpoint's preprocessing), then decodes it as the clip loader does (RawSample -> decode_sample -> collate):
raw video reaches the model through the same code as the training data, with no second decode path.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from emi import storage
from emi.data import build_loader, resolve_shards
from emi.data.urls import shard_name
from emi.data.decode import SampleError, sample_rng
from emi.data.modes import DecodeSpec, collate, decode_sample
from emi.data.reader import RawSample, iter_members
from emi.data.collect import collect
from emi.ensemble import Ensemble, load_ensemble
from emi.errors import UsageError
from emi.features import FrozenEncoders, clip_decoding, clip_features, clip_loader, fusion_batch, load_frozen_encoders
from emi.formats.manifest import Manifest
from emi.metrics import emi_report
from emi.models.fusion import MODALITIES, fusion_inputs, load_fusion, present_modalities
from emi.devices import process_state
from emi.shards.asr import check_whisper, parse_asr
from emi.shards.plan import ClipJob, Failure, SampleOptions, check_videos_folder, escape_reason, may_be_clip
from emi.shards.sample import Sample, SampleBuilder

log = logging.getLogger(__name__)
MODEL_INPUTS = ("vision", "vision_mask", "audio", "audio_mask", "text")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def checkpoint_list(checkpoint: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """`--checkpoint` as a list: one path (a checkpoint or an ensemble folder) or several checkpoints."""
    return [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)


def ensemble_predictions(ensemble: Ensemble, batch: dict[str, Any], device: torch.device,
                         present: torch.Tensor | None = None) -> torch.Tensor:
    """[members, B, K] intensities of a Stage II batch (features-loader layout), on the CPU."""
    batch = {name: batch[name].to(device) for name in (*MODEL_INPUTS, "has_audio", "has_text")}
    return ensemble.predictions(batch, None if present is None else present.to(device))


def check_batching(batch_size: int, workers: int) -> None:
    if batch_size < 1 or workers < 0:
        raise UsageError(f"--batch-size must be at least 1 and --workers at least 0, got {batch_size} and {workers}")


# ----------------------------------------------------------------------------------------------- evaluate

def check_shards(shards: str, manifest: Manifest, ensemble: Ensemble) -> None:
    """The shards carry the labels the checkpoint predicts, features of its dims; warn where clips were prepared
    or features computed unlike its training data."""
    config, dims = ensemble.config, ensemble.models[0].dims
    missing = [name for name in config["labels"] if manifest.labels.get(name) != "float"]
    if missing:
        raise UsageError(f"{shards}: the shards carry no labels {missing}, which the checkpoint predicts; "
                         f"their labels are {sorted(manifest.labels)}")
    if manifest.is_features and manifest.dims != dims:
        raise UsageError(f"{shards}: features of dims {manifest.dims}, the checkpoint expects {dims}")
    if manifest.is_features and manifest.encoders_sha256 not in (None, config["encoders"].get("sha256")):
        log.warning("%s: features come from the encoders in %s, not from those the checkpoint was trained with "
                    "(copied from %s)", shards, manifest.encoders, config["encoders"].get("source"))
    prepared = manifest.preprocessing.to_dict()
    differing = {key: (value, prepared.get(key)) for key, value in config["preprocessing"].items()
                 if prepared.get(key) != value}
    if differing:
        log.warning("%s: clips prepared unlike the checkpoint's training data (checkpoint, shards): %s",
                    shards, differing)


def check_modalities(drop: Sequence[str], corrupt: Sequence[str]) -> None:
    for name in (*drop, *corrupt):
        if name not in MODALITIES:
            raise UsageError(f"--drop and --corrupt take modalities among {list(MODALITIES)}, got {name!r}")
    both = sorted(set(drop) & set(corrupt))
    if both:
        raise UsageError(f"{both}: a modality is either dropped or corrupted, not both")


def corrupted(batch: dict[str, Any], modalities: Sequence[str]) -> dict[str, Any]:
    """The batch with each modality in `modalities` replaced by noise, clip by clip: Gaussian values with the mean
    and standard deviation of that clip's own valid features of the modality (all frames and dimensions), drawn
    from a seed made of the clip key and the modality, so a clip gets the same noise in any batch or run. The
    noise keeps the features' scale and carries nothing of the clip."""
    batch = dict(batch)
    for name in modalities:
        values = batch[name].clone()
        valid = batch[f"{name}_mask"] if name != "text" else torch.ones(values.shape[:1], dtype=torch.bool,
                                                                          device=values.device)[:, None]
        rows = values if name != "text" else values[:, None, :]
        for index, key in enumerate(batch["key"]):
            clip = rows[index][valid[index]]
            if clip.numel() == 0:
                continue
            seed = int(hashlib.sha256(f"{key}/{name}".encode()).hexdigest()[:15], 16)
            noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            std, mean = torch.std_mean(clip.float(), unbiased=False)
            rows[index][valid[index]] = (mean + std * noise.to(clip.device)).to(clip.dtype)
        batch[name] = values
    return batch


def shard_loader(ensemble: Ensemble, shard_set, manifest: Manifest, batch_size: int, workers: int,
                 device: torch.device, world_size: int = 1, rank: int = 0):
    """(loader, features_of) over feature or clip shards for one rank: features_of(batch) is the Stage II batch the
    fusion models take (clip shards go through the checkpoint's encoders, as `emi features extract` would)."""
    labels, num_frames = ensemble.config["labels"], ensemble.config["num_frames"]
    if manifest.is_features:
        data = build_loader(shard_set, mode="features", batch_size=batch_size, num_workers=workers,
                            world_size=world_size, rank=rank, seed=0, shuffle=False, train=False,
                            num_frames=num_frames, label_names=labels, persistent_workers=False)
        return data, lambda batch: batch
    encoders = load_frozen_encoders(ensemble.encoders(), device)
    data = clip_loader(shard_set, encoders, labels, batch_size, workers, world_size, rank)
    return data, lambda batch: fusion_batch(clip_features(encoders, batch, manifest.preprocessing.fps), num_frames)


def shard_predictions(ensemble: Ensemble, shards: str, batch_size: int = 8, workers: int = 1,
                      device: torch.device | None = None, manifest: str | Path | None = None,
                      drop: Sequence[str] = (), corrupt: Sequence[str] = (), state: PartialState | None = None
                      ) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
    """(keys, each member's predictions [members, N, K], targets [N, K], clips skipped) of every readable clip of
    feature or clip shards, each clip once; the skipped ones are those the manifest lists that could not be read or
    decoded. Clip shards go through the checkpoint's encoders. `drop`: modalities removed from every clip (as if
    absent); `corrupt`: modalities replaced by noise (`corrupted`). With `state` (a command on several ranks) every
    rank predicts its share and gets everything (every rank must call this)."""
    device = state.device if state is not None else device or default_device()
    world, rank = (state.num_processes, state.process_index) if state is not None else (1, 0)
    check_modalities(drop, corrupt)
    shard_set = resolve_shards(shards, manifest)
    manifest = shard_set.manifest("emi evaluate")
    check_shards(shards, manifest, ensemble)
    labels = ensemble.config["labels"]
    data, features_of = shard_loader(ensemble, shard_set, manifest, batch_size, workers, device, world, rank)

    def predict(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        features = corrupted(features_of(batch), corrupt)
        present = present_modalities(features)
        present[:, [MODALITIES.index(name) for name in drop]] = False
        return {"pred": ensemble_predictions(ensemble, features, device, present).transpose(0, 1),
                "labels": batch["labels"].cpu(), "label_mask": batch["label_mask"].cpu()}

    keys, out = collect(data, predict, state, device=device)
    for key, row in zip(keys, out["label_mask"]):
        if not row.all():
            absent = [name for name, ok in zip(labels, row.tolist()) if not ok]
            raise UsageError(f"{shards}: clip {key!r} has no label {absent}")
    skipped = shard_set.num_samples - len(keys)
    if skipped:
        log.warning("%s: evaluated %d clips of %d (unreadable samples were skipped; see warnings above)",
                    shards, len(keys), shard_set.num_samples)
    return keys, out["pred"].transpose(0, 1), out["labels"], skipped


def modality_weights(checkpoint: str | Path, shards: str, batch_size: int = 8) -> dict[str, list[float]]:
    """How much the fusion trusted each modality for each clip of feature shards: {key: [vision, audio, text]},
    the fusion weights (the quality-aware betas, or equal weights for mean fusion) averaged over the segments (for
    late fusion: the weights of the modalities' predictions averaged over the emotions). Absent modalities weigh 0.
    Concatenation fusion has no such weights (UsageError)."""
    device = default_device()
    model, config = load_fusion(checkpoint, device)
    if config["model"].get("fusion") == "concat":
        raise UsageError(f"{checkpoint}: concatenation fusion has no per-modality weights")
    data = build_loader(shards, mode="features", batch_size=batch_size, num_workers=0, world_size=1, rank=0,
                        seed=0, shuffle=False, train=False, num_frames=config["num_frames"],
                        label_names=config["labels"], persistent_workers=False)
    keys, out = collect(data, lambda batch: {"betas": model(**fusion_inputs(batch))["weights"].mean(1)},
                        device=device)
    return dict(zip(keys, out["betas"].tolist()))


def shards_name(shards: str) -> str:
    """The name of the (first) shard folder a spec names: `data/features/val` -> `val`."""
    first = shards.split("::")[0].strip()
    if storage.is_url(first):  # s3://bucket/features/val, or .../val/val-{000000..000003}.tar
        parts = first.rstrip("/").split("/")
        return parts[-2] if re.search(r"\.(tar|tgz)\b|\{", parts[-1]) else parts[-1]
    return Path(first).name if os.path.isdir(first) else Path(os.path.abspath(first)).parent.name


def write_figure(pred: np.ndarray, target: np.ndarray, labels: list[str], report: dict, path: str | Path) -> None:
    """Predicted against true intensity per emotion: a grid of scatter plots (3 per row) with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    rows = math.ceil(len(labels) / 3)
    figure, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= len(labels):
            axis.axis("off")
            continue
        name = labels[index]
        axis.scatter(target[:, index], pred[:, index], s=12, alpha=0.7)
        axis.plot([0, 1], [0, 1], color="grey", linewidth=1)
        axis.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="true", ylabel="predicted",
                 title=f"{name}  r = {report[f'pearson/{name}']:.3f}")
    figure.suptitle(f"mean Pearson {report['mean_pearson']:.3f}, MSE {report['mse']:.4f}, "
                    f"{report['num_samples']} clips")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, dpi=100, format="png")
    plt.close(figure)
    storage.write_bytes(path, png.getvalue())  # whole: never a half-written figure under the real name


def evaluate(checkpoint: str | Path | Sequence[str | Path], shards: str, out: str | Path | None = None,
             batch_size: int = 8, tb: str | Path | None = None, workers: int = 1, manifest: str | Path | None = None,
             drop: Sequence[str] = (), corrupt: Sequence[str] = ()) -> dict[str, Any]:
    """Score a checkpoint, or an ensemble (emi.ensemble), on labelled shards: the ensemble's report (also written as
    JSON, a PNG beside it and TensorBoard scalars `eval/<name>/...`, where name is the shard folder's, with
    `-drop-<m>`/`-corrupt-<m>` appended for a robustness evaluation) with each member's scores under "members", and
    the checkpoint, shards, dropped and corrupted modalities it came from. `num_skipped` counts the clips that could
    not be read (the command line then exits EXIT_PARTIAL). On several ranks (accelerate launch -m emi.cli evaluate)
    each rank scores its share of the clips and rank 0 writes the files; every rank returns the report."""
    from torch.utils.tensorboard import SummaryWriter

    check_batching(batch_size, workers)
    check_modalities(drop, corrupt)
    state = process_state()
    device = state.device
    ensemble = load_ensemble(checkpoint_list(checkpoint), device)
    if out is None and ensemble.home is None:
        raise UsageError("several --checkpoint: give --out for the report (or list them in an ensemble folder with "
                         "`emi ensemble`, whose eval/ folder then holds it)")
    if ensemble.home is None and tb is None and storage.is_url(out):
        raise UsageError(f"--out {out}: with several --checkpoint and a URL for the report, give --tb (a local folder)")
    keys, preds, target, skipped = shard_predictions(ensemble, shards, batch_size, workers, device, manifest, drop,
                                                     corrupt, state)
    if len(keys) < 2:
        raise UsageError(f"{shards}: {len(keys)} clip(s); Pearson correlation needs at least 2")
    labels = ensemble.config["labels"]
    pred = preds.mean(0)
    report = {**emi_report(pred, target, labels), "num_skipped": skipped}
    members = [{"checkpoint": str(folder.resolve()),
                **{key: value for key, value in emi_report(member, target, labels).items() if key != "num_samples"}}
               for folder, member in zip(ensemble.checkpoints, preds)]
    name = shards_name(shards) + "".join(f"-drop-{m}" for m in drop) + "".join(f"-corrupt-{m}" for m in corrupt)
    out = str(out) if out is not None else str(ensemble.home / "eval" / f"{name}.json")
    result = {**report, "members": members, "drop": list(drop), "corrupt": list(corrupt),
              "checkpoint": str(ensemble.home.resolve()) if ensemble.home is not None else None,
              "shards": storage.shown(shards)}
    figure = (out[:-len(".json")] if out.endswith(".json") else out) + ".png"
    if tb is None:
        tb = ensemble.home / "eval" / "tb" if ensemble.home is not None else Path(out).parent / "tb"
    if state.is_main_process:  # rank 0 writes; every rank returns the same report
        storage.write_bytes(out, (json.dumps(result, indent=1, ensure_ascii=False) + "\n").encode())
        write_figure(pred.numpy(), target.numpy(), labels, report, figure)
        writer = SummaryWriter(log_dir=str(tb))
        for metric, value in report.items():
            writer.add_scalar(f"eval/{name}/{metric}", value, 0)
        writer.close()
        print(f"emi evaluate: report {storage.shown(out)}, figure {storage.shown(figure)}, TensorBoard scalars "
              f"eval/{name}/* in {tb}", file=sys.stderr, flush=True)
    state.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------------------ predict

def clip_decode_spec(encoders: FrozenEncoders, labels: list[str]) -> DecodeSpec:
    """The decoding `clip_loader` applies to clip shards (emi.features.clip_decoding), with the frames decoded
    chunk by chunk: a video of any length is predicted without holding all its frames decoded."""
    return DecodeSpec(mode="clip", train=False, label_names=tuple(labels), prompt_fn=None, lazy_frames=True,
                      **clip_decoding(encoders))


def raw_sample(sample: Sample, url: str) -> RawSample:
    """A built sample as the shard reader hands it out: tar member names split into key and extension."""
    entries = {}
    with open(sample.part, "rb") as part:
        for _, extension, tar, member in iter_members(part):
            entries[extension] = tar.extractfile(member).read()
    return RawSample(sample.key, url, entries)


def predict(checkpoint: str | Path | Sequence[str | Path], videos: Sequence[str], asr: str | None = None,
            batch_size: int = 8) -> list[dict[str, Any]]:
    """Intensities for each video file, in input order: {"file", "intensities": {name: value}} (an ensemble's: its
    members' mean), or {"file", "error": reason} for a file that cannot be used. asr: 'none' | 'whisper:NAME_OR_PATH'
    overrides the checkpoint's preprocessing.asr."""
    check_batching(batch_size, workers=0)
    device = default_device()
    ensemble = load_ensemble(checkpoint_list(checkpoint), device)
    with video_predictor(ensemble, asr, device) as predictor:
        return predictor(videos, range(len(videos)), batch_size)


@contextmanager
def video_predictor(ensemble: Ensemble, asr: str | None, device: torch.device):
    """predictor(videos, indices, batch_size) -> results of videos[i] for i in indices (as `predict` gives them):
    each video prepared as the shard builder prepared the checkpoints' training clips."""
    prepared = ensemble.config["preprocessing"]
    asr_model = parse_asr(asr if asr is not None else prepared.get("asr", "none"))
    if asr_model is not None:
        check_whisper(asr_model)
    encoders = load_frozen_encoders(ensemble.encoders(), device)
    parts = Path(tempfile.mkdtemp(prefix="emi-predict-"))
    try:
        builder = SampleBuilder(SampleOptions(
            split="predict", fps=float(prepared["fps"]), sample_rate=int(prepared["sample_rate"]),
            frame_size=int(prepared["frame_size"]), asr_model=asr_model, face_crop=prepared["face_crop"] == "opencv"),
            parts)
        yield lambda videos, indices, batch_size: _predict(ensemble, encoders, builder, videos, list(indices),
                                                            batch_size, device)
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def _predict(ensemble: Ensemble, encoders: FrozenEncoders, builder: SampleBuilder, videos: Sequence[str],
             indices: list[int], batch_size: int, device: torch.device) -> list[dict[str, Any]]:
    config = ensemble.config
    prepared = config["preprocessing"]
    spec = clip_decode_spec(encoders, config["labels"])

    results: dict[int, dict[str, Any]] = {index: {"file": videos[index]} for index in indices}
    for start in range(0, len(indices), batch_size):
        decoded, done = [], []
        for index in indices[start:start + batch_size]:
            video = videos[index]
            key = f"{index:06d}"  # a WebDataset key: the file name may hold dots
            built = builder(ClipJob(key=key, path=os.path.abspath(video), source=video, labels={}, transcript=None))
            if isinstance(built, Failure):
                results[index]["error"] = built.reason
                continue
            try:
                raw = raw_sample(built, video)
                built.part.unlink()
                decoded.append(decode_sample(raw, spec, sample_rng(0, 0, key)))
            except SampleError as err:
                results[index]["error"] = str(err)
                continue
            done.append(index)
        if not decoded:
            continue
        batch = collate(decoded, spec)
        # the frames are decoded here, chunk by chunk: JPEGs the builder has just written
        clips = clip_features(encoders, batch, float(prepared["fps"]))
        preds = ensemble_predictions(ensemble, fusion_batch(clips, config["num_frames"]), device).mean(0)
        for row, index in enumerate(done):
            results[index]["intensities"] = dict(zip(config["labels"], preds[row].tolist()))
    return [results[index] for index in indices]


# ------------------------------------------------------------------------------------------ batch predict

@dataclass
class BatchPrediction:
    out: str | Path
    report: str | Path
    num_predicted: int
    failures: list[dict[str, str]]  # {"file" or "key", "reason"}
    main_process: bool = True  # the rank that wrote the files and prints the summary

    def describe(self) -> str:
        lines = [f"{self.num_predicted} clip(s) predicted into {storage.shown(self.out)}"]
        if self.failures:
            lines.append(f"{len(self.failures)} could not be predicted: reasons in {storage.shown(self.report)}")
        return "\n".join(lines)


def video_files(folder: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """The clips of a videos folder as the shard builder sees them (its files but hidden ones and NOT_CLIPS, by
    name), and those refused by the builder's rule, with the reason ({"file", "reason"}: a symlink out of it)."""
    folder = Path(folder)
    check_videos_folder(folder)
    clips, refused = [], []
    for path in sorted(folder.iterdir()):
        if not may_be_clip(path) or path.is_dir():
            continue
        reason = escape_reason(path, folder)
        if reason is None:
            clips.append(str(path))
        else:
            refused.append({"file": str(path), "reason": reason})
    return clips, refused


def predict_to_csv(checkpoint: str | Path | Sequence[str | Path], out: str | Path, shards: str | None = None,
                   videos: Sequence[str] | None = None, manifest: str | Path | None = None, asr: str | None = None,
                   batch_size: int = 8, workers: int = 1, refused: Sequence[dict[str, str]] = ()) -> BatchPrediction:
    """Predict every clip of `shards` (clip or feature shards) or every file of `videos`, on however many ranks this
    runs (accelerate launch, torchrun, srun, or one process): each rank its share, gathered once (no clip twice,
    none missing); rank 0 writes `out`, the challenge's CSV (Filename, then the checkpoint's labels; one row per
    clip, in input order), and `<out>.failures.json`. Filename is the clip id: the shard key, or the file's name
    without its extension. `checkpoint`: one checkpoint, an ensemble folder or several checkpoints, whose
    predictions are averaged. `refused`: files of a videos folder refused before prediction (`video_files`), reported
    with the failures."""
    check_batching(batch_size, workers)
    if (shards is None) == (videos is None):
        raise UsageError("give clips to predict: --shards URL or --videos DIR (or video files), not both")
    state = process_state()
    device, rank, world = state.device, state.process_index, state.num_processes
    ensemble = load_ensemble(checkpoint_list(checkpoint), device)
    if shards is not None:
        shard_set = resolve_shards(shards, manifest)
        described = shard_set.manifest("emi predict")
        data, features_of = shard_loader(ensemble, shard_set, described, batch_size, workers, device, world, rank)
        keys, outputs = collect(
            data, lambda batch: {"pred": ensemble_predictions(ensemble, features_of(batch), device).mean(0)}, state)
        predicted = dict(zip(keys, outputs["pred"].tolist()))
        listed = {entry.name: entry.keys for source in shard_set.manifests for entry in source.shards}
        order = [key for info in shard_set.shards for key in listed.get(shard_name(info.url), [])] or keys
        rows = [(key, predicted[key]) for key in order if key in predicted]
        failures = [{"key": key, "reason": "unreadable sample (see the warnings in the log)"}
                    for key in order if key not in predicted]
    else:
        indices = range(rank, len(videos), world)  # every rank its share, each video on one rank
        with video_predictor(ensemble, asr, device) as predictor:
            mine = list(zip(indices, predictor(videos, indices, batch_size)))
        results = dict(gather_object(mine))
        if sorted(results) != list(range(len(videos))):
            raise RuntimeError(f"gathered predictions for {len(results)} of {len(videos)} videos")
        rows, failures, seen = [], list(refused), set()
        for index in range(len(videos)):
            result, clip_id = results[index], Path(videos[index]).stem
            if "error" in result:
                failures.append({"file": videos[index], "reason": result["error"]})
            elif clip_id in seen:
                failures.append({"file": videos[index], "reason": f"another file has the clip id {clip_id!r}"})
            else:
                seen.add(clip_id)
                rows.append((clip_id, list(result["intensities"].values())))
    report = (str(out)[:-len(".csv")] if str(out).endswith(".csv") else str(out)) + ".failures.json"
    if state.is_main_process:  # rank 0 writes; every rank returns the same summary
        lines = ["Filename," + ",".join(ensemble.config["labels"])]
        lines += [f"{clip_id}," + ",".join(f"{value:.6f}" for value in values) for clip_id, values in rows]
        storage.write_bytes(out, ("\n".join(lines) + "\n").encode())
        storage.write_bytes(report, (json.dumps({
            "checkpoint": str(ensemble.home) if ensemble.home is not None else None,
            "members": [str(folder) for folder in ensemble.checkpoints],
            "shards": storage.shown(shards) if shards is not None else None,
            "num_predicted": len(rows), "num_failed": len(failures), "failures": failures},
            indent=1, ensure_ascii=False) + "\n").encode())
    state.wait_for_everyone()
    return BatchPrediction(out=out, report=report, num_predicted=len(rows), failures=failures,
                           main_process=state.is_main_process)
