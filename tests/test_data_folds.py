"""K-fold over train + val by clip key (emi.data.folds): the assignment, the shard subsets, and the loader over a
fold (equal batches on every rank, exactly the fold's clips, exact mid-epoch resume)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from emi.config import Stage1Config, Stage2Config, load_config
from emi.data import resolve_shards
from emi.data.folds import fold_of, fold_split
from emi.errors import UsageError

from helpers import assert_same_batches, flat_loader, run_epoch, write_shards


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("folds")
    train = write_shards(root / "train", [5, 7], frames=(3, 4), size=(24, 24))
    val = write_shards(root / "val", [4], split="val", frames=(3, 4), size=(24, 24), key_prefix="v")
    return root / "train", root / "val", [key for shard in train + val for key in shard]


def test_folds_are_balanced_deterministic_and_independent_of_order():
    keys = [f"{i:05d}" for i in range(1, 24)]
    folds = fold_of(keys, 5)
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    assert fold_of(shuffled, 5) == folds
    sizes = sorted(list(folds.values()).count(fold) for fold in range(5))
    assert sizes == [4, 4, 5, 5, 5]
    # consecutive names spread over the folds instead of filling them in turn
    assert len({folds[key] for key in keys[:5]}) > 1 and [folds[key] for key in keys[:5]] != [0, 1, 2, 3, 4]


def test_a_fold_split_partitions_the_union_of_train_and_val(splits):
    train, val, keys = splits
    seen_in_val, sizes = [], []
    for fold in range(3):
        fold_train, fold_val = fold_split(resolve_shards(str(train)), resolve_shards(str(val)), 3, fold)
        in_train = {key for shard in fold_train.shards for key in shard.keys}
        in_val = {key for shard in fold_val.shards for key in shard.keys}
        assert not in_train & in_val and in_train | in_val == set(keys)
        assert fold_train.num_samples == len(in_train) and fold_val.num_samples == len(in_val)
        assert [shard.url for shard in fold_val.shards] == [shard.url for shard in fold_train.shards]
        assert fold_val.manifest("test").split == "train"  # the union's manifests agree on what samples are
        assert f"fold {fold} of 3" in fold_val.spec
        seen_in_val += in_val
        sizes.append(len(in_val))
    assert sorted(seen_in_val) == sorted(keys)  # every clip validated exactly once over the folds
    assert sorted(sizes) == [5, 5, 6]


def test_two_ranks_read_exactly_the_fold_in_equal_batches_and_resume_exactly(splits):
    train, val, _ = splits
    fold_train, _ = fold_split(resolve_shards(str(train)), resolve_shards(str(val)), 4, 1)
    wanted = {key for shard in fold_train.shards for key in shard.keys}

    def loader(rank: int):
        return flat_loader(
            fold_train,
            mode="clip",
            batch_size=2,
            num_workers=2,
            world_size=2,
            rank=rank,
            seed=3,
            shuffle=True,
            train=True,
            shuffle_buffer=4,
            num_frames=2,
            persistent_workers=False,
        )

    ranks = [loader(rank) for rank in (0, 1)]
    # 12 clips over 2 ranks x 2 workers: 3 each, rounded up to whole batches of 2
    assert [data.num_batches for data in ranks] == [4, 4]
    epochs = [run_epoch(data, 1) for data in ranks]
    read = [key for epoch in epochs for batch in epoch for key in batch["key"]]
    assert len(read) == 16 and set(read) == wanted
    assert_same_batches(run_epoch(ranks[1], 1, skip_batches=3), epochs[1][3:])


def test_fold_errors_name_the_problem(splits, tmp_path):
    train, val, _ = splits
    with pytest.raises(UsageError, match="clip key 's0-000' is in .*train-000000.tar and in .*train-000000.tar"):
        fold_split(resolve_shards(str(train)), resolve_shards(str(train)), 2, 0)
    with pytest.raises(UsageError, match="16 clips cannot fill 20 folds"):
        fold_split(resolve_shards(str(train)), resolve_shards(str(val)), 20, 0)
    old = tmp_path / "old"
    write_shards(old, [3], frames=(3, 3), size=(24, 24))
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["keys"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="no manifest lists the keys of the samples of shard .*train-000000.tar"):
        fold_split(resolve_shards(str(old)), None, 2, 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.folds=1"], "data.folds must be >= 2"),
        (["data.folds=3", "data.fold=3"], "0 <= data.fold < data.folds"),
        (["data.fold=1"], "data.folds must be >= 2"),
    ],
)
def test_fold_settings_are_checked(overrides, message):
    with pytest.raises(UsageError, match=message):
        load_config(Stage2Config, None, overrides)
    assert load_config(Stage2Config, None, ["data.folds=3", "data.fold=2"]).data.fold == 2
    with pytest.raises(UsageError, match="unknown key 'data.folds' in data"):  # a Stage II setting
        load_config(Stage1Config, None, ["data.folds=3"])
