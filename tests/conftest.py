"""Test-wide environment: CPU DeepSpeed, one BLAS thread per process, never touch a model hub."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Small synthetic train/val shard sets (real mp4 clips through the real shard builder), built once."""
    from helpers import synthetic_split

    root = tmp_path_factory.mktemp("synthetic")
    return {"train": synthetic_split(root, "train", clips=48, seed=0),
            "val": synthetic_split(root, "val", clips=16, seed=1)}


@pytest.fixture(scope="session")
def tiny_features(synthetic_shards, tmp_path_factory):
    """Stage II feature shards of `synthetic_shards` (train, val) from tiny random Stage I encoders, extracted once
    in this process; read them, never change them (tests that damage features make their own)."""
    import torch
    import yaml

    from emi.serve.features import extract_features
    from emi.models.encoders import ContrastiveModel, build_tokenizer, export_encoders
    from helpers import REPO

    spec = yaml.safe_load((REPO / "configs/stage1/tiny.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = ContrastiveModel(spec["vision"], spec["text"], spec["audio"], spec["embed_dim"])
    root = tmp_path_factory.mktemp("tiny-features")
    export_encoders(model, model.state_dict(), root / "encoders", build_tokenizer(spec["text"]))
    for split in ("train", "val"):
        extract_features(root / "encoders", str(synthetic_shards[split]), root / split, batch_size=4, num_workers=0)
    return {"train": root / "train", "val": root / "val"}
