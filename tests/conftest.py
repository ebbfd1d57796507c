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
