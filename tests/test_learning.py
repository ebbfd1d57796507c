"""Learning, asserted: the full pipeline (Stage I tiny encoders, features, Stage II) on ~600 train / 200 val
synthetic clips, through the real command lines with 2 processes. Slow (about 10 minutes each on 2 cores): run
with `make test-slow`. The measured numbers and the full ablation table are in benchmarks/RESULTS.md
(`make ablation`); the thresholds here sit below them (full model: 0.7219 +- 0.0037 over three seeds there,
0.7084 in one run after the loader moved to torch's antialiased resize; 0.70 asserted).
"""

from __future__ import annotations

import pytest

from benchmarks.ablation import STAGE1, STAGE1_EPOCHS, STAGE2_EPOCHS  # the learning tests follow the ablation's recipe
from emi.demo import Pipeline
from emi.serve.robustness import mean_weight, modality_weights
from emi.synth import read_corruption

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * 3600)]  # tens of minutes each on 2 cores


def trained_pipeline(root, **corruption) -> Pipeline:
    pipeline = Pipeline(root, train_clips=600, val_clips=200, verbose=False, **corruption)
    pipeline.prepare_data()
    pipeline.extract_features(pipeline.train_stage1("stage1", STAGE1_EPOCHS, *STAGE1))
    return pipeline


def test_full_pipeline_reaches_val_mean_pearson_0_7(tmp_path):
    best = trained_pipeline(tmp_path).train_stage2("qam", STAGE2_EPOCHS)
    assert best["num_samples"] == 200
    assert best["mean_pearson"] >= 0.70, best


def test_quality_aware_fusion_turns_away_from_corrupted_audio_and_beats_plain_averaging(tmp_path):
    """Half of the clips have their audio replaced by loud noise. The quality-aware weights move away from it
    clip by clip (measured: audio weight 0.21 on clean val clips, 0.04 on corrupted ones); plain averaging
    cannot, and ends lower. One seed is not enough to say so: the make ablation sweep measured QAM 0.6323 +- 0.0061
    and mean 0.6108 +- 0.0035 over three Stage II seeds, a difference of 0.021 that varied from +0.005 to +0.022
    seed by seed; so both train with the same three seeds and their means are compared (standard error of the
    difference about 0.004)."""
    pipeline = trained_pipeline(tmp_path, corrupt_modality="audio", corrupt_frac=0.5)
    seeds = (0, 1, 2)
    qam = [pipeline.train_stage2(f"qam-{seed}", STAGE2_EPOCHS, f"run.seed={seed}")["mean_pearson"] for seed in seeds]
    mean = [
        pipeline.train_stage2(f"mean-{seed}", STAGE2_EPOCHS, "model.fusion=mean", f"run.seed={seed}")["mean_pearson"]
        for seed in seeds
    ]
    assert sum(qam) / len(qam) > sum(mean) / len(mean), (qam, mean)
    clean, corrupted = read_corruption(pipeline.root / "data/synth/val/corruption.csv")
    weights = modality_weights(pipeline.root / "runs/qam-0/best", str(pipeline.features("val")))
    assert len(clean) == len(corrupted) == 100
    assert mean_weight(weights, corrupted, "audio") < mean_weight(weights, clean, "audio") / 3
