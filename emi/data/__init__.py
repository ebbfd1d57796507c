"""Streaming WebDataset loaders with exact per-rank epoch accounting and exact mid-epoch resume."""

from emi.data.decode import AudioSpec, ImageSpec
from emi.data.loader import DataInfo, LoaderSpec, Mix, Sampling, Source, Workers, build_loader, workers_of
from emi.data.modes import MODES, DecodeSpec
from emi.data.urls import ShardInfo, ShardSet, resolve_shards

__all__ = [
    "MODES",
    "AudioSpec",
    "DataInfo",
    "DecodeSpec",
    "ImageSpec",
    "LoaderSpec",
    "Mix",
    "Sampling",
    "ShardInfo",
    "ShardSet",
    "Source",
    "Workers",
    "build_loader",
    "resolve_shards",
    "workers_of",
]
