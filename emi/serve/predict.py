"""`emi predict`: the EMI intensities of raw video files (JSON), and of a videos folder or of shards into the
challenge's CSV, on one rank or several.

    emi predict --checkpoint runs/<stage2>/best clip1.mp4 clip2.mp4
    emi predict --checkpoint runs/<stage2>/best --videos DIR --out predictions.csv
    accelerate launch -m emi.cli predict --checkpoint ... --shards data/shards/test --out predictions.csv

Each video is prepared as the shard builder prepared the checkpoint's training clips (SampleBuilder with the
checkpoint's preprocessing), then decoded as the clip loader decodes (RawSample -> decode_sample -> collate): raw
video reaches the model through the same code as the training data, with no second decode path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from emi import storage
from emi.data import resolve_shards
from emi.data.collect import collect
from emi.data.decode import SampleError, sample_rng
from emi.data.modes import collate, decode_sample
from emi.data.reader import RawSample, iter_members
from emi.data.urls import ShardSet, shard_name
from emi.devices import default_device, process_state
from emi.errors import UsageError
from emi.serve.ensemble import Ensemble, load_ensemble
from emi.serve.features import FrozenEncoders, clip_decoding, clip_features, fusion_batch, load_frozen_encoders
from emi.serve.scoring import check_batching, checkpoint_list, ensemble_predictions, shard_loader
from emi.shards.asr import check_whisper, parse_asr
from emi.shards.plan import ClipJob, Failure, SampleOptions, check_videos_folder, escape_reason, may_be_clip
from emi.shards.sample import Sample, SampleBuilder


def raw_sample(sample: Sample, url: str) -> RawSample:
    """A built sample as the shard reader hands it out: tar member names split into key and extension."""
    entries = {}
    with open(sample.part, "rb") as part:
        for _, extension, tar, member in iter_members(part):
            entries[extension] = tar.extractfile(member).read()
    return RawSample(sample.key, url, entries)


def predict(
    checkpoint: str | Path | Sequence[str | Path], videos: Sequence[str], asr: str | None = None, batch_size: int = 8
) -> list[dict[str, Any]]:
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
    prepared = ensemble.record.preprocessing
    asr_model = parse_asr(asr if asr is not None else prepared.asr)
    if asr_model is not None:
        check_whisper(asr_model)
    encoders = load_frozen_encoders(ensemble.encoders(), device)
    parts = Path(tempfile.mkdtemp(prefix="emi-predict-"))
    try:
        builder = SampleBuilder(
            SampleOptions(
                split="predict",
                fps=prepared.fps,
                sample_rate=prepared.sample_rate,
                frame_size=prepared.frame_size,
                asr_model=asr_model,
                face_crop=prepared.face_crop == "opencv",
            ),
            parts,
        )
        yield lambda videos, indices, batch_size: _predict(
            ensemble, encoders, builder, videos, list(indices), batch_size, device
        )
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def _predict(
    ensemble: Ensemble,
    encoders: FrozenEncoders,
    builder: SampleBuilder,
    videos: Sequence[str],
    indices: list[int],
    batch_size: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    record = ensemble.record
    # the clip loader's decoding, with the frames decoded chunk by chunk: a video of any length is predicted
    # without holding all its frames decoded
    spec = clip_decoding(encoders, record.labels, lazy_frames=True)

    results: dict[int, dict[str, Any]] = {index: {"file": videos[index]} for index in indices}
    for start in range(0, len(indices), batch_size):
        decoded, done = [], []
        for index in indices[start : start + batch_size]:
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
        clips = clip_features(encoders, batch, record.preprocessing.fps)
        preds = ensemble_predictions(ensemble, fusion_batch(clips, record.num_frames), device).mean(0)
        for row, index in enumerate(done):
            results[index]["intensities"] = dict(zip(record.labels, preds[row].tolist()))
    return [results[index] for index in indices]


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


def predict_to_csv(
    checkpoint: str | Path | Sequence[str | Path],
    out: str | Path,
    shards: str | None = None,
    videos: Sequence[str] | None = None,
    manifest: str | Path | None = None,
    asr: str | None = None,
    batch_size: int = 8,
    workers: int = 1,
    refused: Sequence[dict[str, str]] = (),
) -> BatchPrediction:
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
    ensemble = load_ensemble(checkpoint_list(checkpoint), state.device)
    if shards is not None:
        rows, failures = _predict_shards(ensemble, resolve_shards(shards, manifest), batch_size, workers, state)
    else:
        rows, failures = _predict_videos(ensemble, videos, asr, batch_size, state)
        failures = [*refused, *failures]
    report = (str(out)[: -len(".csv")] if str(out).endswith(".csv") else str(out)) + ".failures.json"
    if state.is_main_process:  # rank 0 writes; every rank returns the same summary
        lines = ["Filename," + ",".join(ensemble.record.labels)]
        lines += [f"{clip_id}," + ",".join(f"{value:.6f}" for value in values) for clip_id, values in rows]
        storage.write_bytes(out, ("\n".join(lines) + "\n").encode())
        summary = {
            "checkpoint": str(ensemble.home) if ensemble.home is not None else None,
            "members": [str(folder) for folder in ensemble.checkpoints],
            "shards": storage.shown(shards) if shards is not None else None,
            "num_predicted": len(rows),
            "num_failed": len(failures),
            "failures": failures,
        }
        storage.write_bytes(report, (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())
    state.wait_for_everyone()
    return BatchPrediction(
        out=out, report=report, num_predicted=len(rows), failures=failures, main_process=state.is_main_process
    )


Rows = list[tuple[str, list[float]]]


def _predict_shards(
    ensemble: Ensemble, shard_set: ShardSet, batch_size: int, workers: int, state: PartialState
) -> tuple[Rows, list[dict]]:
    """(clip id, intensities) for every readable sample of the shards, in the manifests' order, and the failures."""
    described = shard_set.manifest("emi predict")
    data, features_of = shard_loader(
        ensemble, shard_set, described, batch_size, workers, state.device, state.num_processes, state.process_index
    )
    keys, outputs = collect(
        data, lambda batch: {"pred": ensemble_predictions(ensemble, features_of(batch), state.device).mean(0)}, state
    )
    predicted = dict(zip(keys, outputs["pred"].tolist()))
    listed = {entry.name: entry.keys for source in shard_set.manifests for entry in source.shards}
    order = [key for info in shard_set.shards for key in listed.get(shard_name(info.url), [])] or keys
    rows = [(key, predicted[key]) for key in order if key in predicted]
    failures = [
        {"key": key, "reason": "unreadable sample (see the warnings in the log)"}
        for key in order
        if key not in predicted
    ]
    return rows, failures


def _predict_videos(
    ensemble: Ensemble, videos: Sequence[str], asr: str | None, batch_size: int, state: PartialState
) -> tuple[Rows, list[dict]]:
    """(clip id, intensities) for every video file, each decoded on one rank, in the given order, and the
    failures (a file that cannot be read, a clip id taken by an earlier file)."""
    indices = range(state.process_index, len(videos), state.num_processes)
    with video_predictor(ensemble, asr, state.device) as predictor:
        mine = list(zip(indices, predictor(videos, indices, batch_size)))
    results = dict(gather_object(mine))
    if sorted(results) != list(range(len(videos))):
        raise RuntimeError(f"gathered predictions for {len(results)} of {len(videos)} videos")
    rows, failures, seen = [], [], set()
    for index, video in enumerate(videos):
        result, clip_id = results[index], Path(video).stem
        if "error" in result:
            failures.append({"file": video, "reason": result["error"]})
        elif clip_id in seen:
            failures.append({"file": video, "reason": f"another file has the clip id {clip_id!r}"})
        else:
            seen.add(clip_id)
            rows.append((clip_id, list(result["intensities"].values())))
    return rows, failures
