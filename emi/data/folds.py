"""K-fold splits over the union of the train and val shards, by clip key (Stage II's `data.folds`, `data.fold`).

The clips' keys, ordered by the sha256 of the key, are dealt out in turn: the j-th goes to fold j mod K. So the folds
differ in size by at most one clip, and which fold a clip is in depends only on the set of keys: the same on every
rank and in every run, whatever the shard order or the number of processes (adding clips to the data set moves some
clips to other folds). The hash spreads consecutive names (00001, 00002, ...) over all folds.

A fold is a subset of every shard's samples, written into the shard list: each shard keeps the keys it contributes
(ShardInfo.keys) and counts only those (ShardInfo.num_samples). The epoch plan, the equal batches per rank and the
exact mid-epoch resume work on those counts unchanged; the reader passes over the other samples unread. The counts
come from the keys every shard's manifest lists, so they are known before anything is read.
"""

from __future__ import annotations

import hashlib

from emi.data.urls import ShardInfo, ShardSet
from emi.errors import UsageError


def fold_of(keys: list[str], folds: int) -> dict[str, int]:
    """{key: its fold in [0, folds)} for a list of distinct keys (see the module docstring)."""
    ordered = sorted(keys, key=lambda key: hashlib.sha256(key.encode("utf-8")).hexdigest())
    return {key: index % folds for index, key in enumerate(ordered)}


def listed_keys(shards: ShardSet, needed_by: str) -> list[list[str]]:
    """The keys of every shard's samples, as the shards' manifests list them; UsageError when one lists none."""
    keys = []
    for index, shard in enumerate(shards.shards):
        entry = shards.entries[index] if index < len(shards.entries) else None
        if entry is None or len(entry.keys) != shard.num_samples:
            raise UsageError(
                f"{needed_by}: no manifest lists the keys of the samples of shard {shard.url} "
                "(manifests written by an older emi do not): build the shards and extract the "
                "features again"
            )
        keys.append(list(entry.keys))
    return keys


def fold_split(train: ShardSet, val: ShardSet | None, folds: int, fold: int) -> tuple[ShardSet, ShardSet]:
    """(train, val) shard sets of fold `fold` of `folds` over every clip of `train` and `val`: val is the fold,
    train the rest. UsageError when a key appears twice (a clip key must name one clip) or keys are not listed."""
    if folds < 2 or not 0 <= fold < folds:
        raise UsageError(f"data.folds must be >= 2 and 0 <= data.fold < data.folds, got folds={folds} fold={fold}")
    sets = [train] if val is None else [train, val]
    shards = [shard for shard_set in sets for shard in shard_set.shards]
    keys = [keys for shard_set in sets for keys in listed_keys(shard_set, "data.folds")]
    where: dict[str, str] = {}
    for shard, shard_keys in zip(shards, keys):
        for key in shard_keys:
            if key in where:
                raise UsageError(
                    f"data.folds: clip key {key!r} is in {where[key]} and in {shard.url}; k-fold "
                    "splits by key, so every clip of train and val needs its own key"
                )
            where[key] = shard.url
    assigned = fold_of(list(where), folds)
    if len(assigned) < folds:
        raise UsageError(f"data.folds: {len(assigned)} clips cannot fill {folds} folds")
    union = "::".join(shard_set.spec for shard_set in sets)
    manifests = list({id(m): m for shard_set in sets for m in shard_set.manifests}.values())
    entries = [entry for shard_set in sets for entry in shard_set.entries]

    def subset(in_fold: bool, spec: str) -> ShardSet:
        chosen = [frozenset(key for key in shard_keys if (assigned[key] == fold) == in_fold) for shard_keys in keys]
        return ShardSet(
            spec,
            [ShardInfo(shard.url, len(subset_keys), subset_keys) for shard, subset_keys in zip(shards, chosen)],
            manifests,
            [],
            entries,
        )

    return (
        subset(False, f"{union} without fold {fold} of {folds}"),
        subset(True, f"fold {fold} of {folds} of {union}"),
    )
