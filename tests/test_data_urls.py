"""Shard specs in every WebDataset form resolve to the right URLs and sample counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from emi.data.urls import ShardInfo, resolve_shards, shard_name
from emi.errors import UsageError

from helpers import write_shards

SIZES = [3, 5, 2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("urls")
    write_shards(out / "with", SIZES, frames=(1, 1), size=(16, 16))
    write_shards(out / "without", SIZES, frames=(1, 1), size=(16, 16), manifest=False)
    return out


def expected(folder: Path, shards=(0, 1, 2)) -> list[ShardInfo]:
    return [ShardInfo(str(folder / f"train-{i:06d}.tar"), SIZES[i]) for i in shards]


def test_folder_with_manifest(folder):
    assert resolve_shards(str(folder / "with")).shards == expected(folder / "with")


def test_path_list_brace_pattern_and_double_colon_list_count_from_the_manifest(folder, caplog):
    with_manifest = folder / "with"
    paths = [str(with_manifest / f"train-{i:06d}.tar") for i in (2, 0)]
    assert resolve_shards(paths).shards == expected(with_manifest, (2, 0))
    assert resolve_shards(str(with_manifest / "train-{000000..000002}.tar")).shards == expected(with_manifest)
    assert resolve_shards("::".join(paths)).shards == expected(with_manifest, (2, 0))
    assert "counting" not in caplog.text


def test_without_manifest_counts_by_reading_and_warns(folder, caplog):
    bare = folder / "without"
    assert resolve_shards(str(bare / "train-{000000..000002}.tar")).shards == expected(bare)
    assert caplog.text.count("counting its samples by reading it once") == 3
    assert str(bare / "train-000001.tar") in caplog.text


def test_pipe_urls_count_from_an_explicit_manifest_or_by_streaming(folder, caplog):
    with_manifest = folder / "with"
    spec = f"pipe:cat {with_manifest}/train-{{000000..000002}}.tar"
    urls = [f"pipe:cat {with_manifest}/train-{i:06d}.tar" for i in range(3)]
    assert resolve_shards(spec, manifest=with_manifest / "manifest.json").shards == [
        ShardInfo(url, n) for url, n in zip(urls, SIZES)
    ]
    assert "counting" not in caplog.text
    assert resolve_shards(spec).shards == [ShardInfo(url, n) for url, n in zip(urls, SIZES)]
    assert "counting its samples" in caplog.text


def test_shard_name_of_remote_urls():
    assert shard_name("pipe:cat /x/train-000001.tar") == "train-000001.tar"
    assert shard_name("pipe:aws s3 cp s3://bucket/val-000002.tar -") == "val-000002.tar"
    assert shard_name("https://host/data/train-000003.tar?token=1") == "train-000003.tar"


def test_bad_specs_name_the_file_and_the_reason(folder, tmp_path):
    with pytest.raises(UsageError, match=r"missing-000000\.tar: no such file"):
        resolve_shards(str(folder / "with" / "missing-000000.tar"))
    bad = tmp_path / "bad"
    shutil.copytree(folder / "with", bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "something/2", "shards": []}))
    with pytest.raises(UsageError, match=r"manifest .*bad/manifest\.json: format is 'something/2'"):
        resolve_shards(str(bad))
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"bad/manifest\.json: not readable JSON"):
        resolve_shards(str(bad / "train-000000.tar"))
    (bad / "manifest.json").write_text(
        json.dumps({"format": "emi-shards/1", "shards": [{"name": "train-000000.tar", "num_samples": -1}]})
    )
    with pytest.raises(UsageError, match=r"bad shard entry"):
        resolve_shards(str(bad))
    with pytest.raises(UsageError, match="names no shards"):
        resolve_shards([])


def test_the_shard_set_carries_the_manifests_that_describe_it(folder, tmp_path):
    with_manifest = folder / "with"
    resolved = resolve_shards(str(with_manifest))
    (manifest,) = resolved.manifests
    assert manifest.path == with_manifest / "manifest.json" and manifest.counts == {
        f"train-{i:06d}.tar": n for i, n in enumerate(SIZES)
    }
    assert resolved.manifest("a test") is manifest and resolved.num_samples == sum(SIZES)
    # a shard no manifest lists: counted, but nothing says how its clips were prepared
    bare = resolve_shards(f"{with_manifest}/train-000000.tar::{folder}/without/train-000001.tar")
    assert bare.undescribed == [f"{folder}/without/train-000001.tar"]
    with pytest.raises(UsageError, match=r"a test: no manifest\.json lists shard .*without/train-000001\.tar"):
        bare.manifest("a test")
    # two folders whose manifests disagree on how the clips were prepared cannot be used as one
    other = tmp_path / "other"
    shutil.copytree(with_manifest, other)
    document = json.loads((other / "manifest.json").read_text())
    document["preprocessing"] = {"fps": 10.0}
    (other / "manifest.json").write_text(json.dumps(document))
    mixed = resolve_shards(f"{with_manifest}::{other}")
    assert len(mixed.manifests) == 2
    with pytest.raises(UsageError, match=r"mixes shards whose manifests differ in preprocessing"):
        mixed.manifest("a test")
