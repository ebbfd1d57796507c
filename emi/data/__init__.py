"""Streaming WebDataset loaders with exact per-rank epoch accounting and exact mid-epoch resume."""
from emi.data.decode import AudioSpec, ImageSpec
from emi.data.loader import DataInfo, build_loader
from emi.data.modes import MODES
from emi.data.urls import ShardInfo, ShardSet, resolve_shards

__all__ = ["AudioSpec", "DataInfo", "ImageSpec", "MODES", "ShardInfo", "ShardSet", "build_loader", "resolve_shards"]
