"""The wheel as a user installs it: built from the sources, installed into a fresh folder, run from a folder
outside the repository with nothing of the checkout on the path."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emi import EMI_EMOTIONS

from helpers import GRID, REPO, cpu_env

WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "emi")  # what setuptools packs (emi/configs inside)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """emi built into a wheel from a copy of its sources, then installed with `pip --target` (no dependencies:
    those of this venv serve) into a folder that is the only place emi can come from."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
        check=True,
        capture_output=True,
        cwd=root,
    )
    (wheel,) = (root / "dist").glob("emi-*.whl")
    site = root / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True, cwd=root
    )
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = cpu_env()
    env["PYTHONPATH"] = str(site)  # instead of the repository, which cpu_env puts there
    return {"site": site, "cwd": elsewhere, "env": env, "emi": [str(site / "bin" / "emi")], "source": source}


def run(installed: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*installed["emi"], *args],
        cwd=installed["cwd"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"emi {' '.join(args)} -> {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def test_the_installed_package_is_the_wheel_with_its_configs(installed):
    probe = (
        "import emi, emi.configs, emi.stages.stage1; from emi.engine.distributed import DEEPSPEED_CONFIGS; "
        "print(emi.__file__); print(DEEPSPEED_CONFIGS)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=installed["cwd"],
        env=installed["env"],
        capture_output=True,
        text=True,
        check=True,
    )
    module, deepspeed = map(Path, result.stdout.split())
    assert module.is_relative_to(installed["site"]) and deepspeed.is_relative_to(installed["site"])
    assert json.loads((deepspeed / "zero2.json").read_text())["zero_optimization"]["stage"] == 2
    shipped = installed["site"] / "emi" / "configs"
    for config in (
        "stage1/tiny.yaml",
        "stage1/vitl.yaml",
        "stage2/tiny.yaml",
        "accelerate/cpu.yaml",
        "deepspeed/zero3.json",
    ):
        assert (shipped / config).read_bytes() == (REPO / "configs" / config).read_bytes(), config
    assert not (installed["site"] / "tests").exists() and not (installed["site"] / "train").exists()


def test_every_module_of_the_checkout_imports_from_the_wheel(installed):
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "emi").rglob("*.py")
    )
    probe = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(importlib.import_module(name).__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe, *modules],
        cwd=installed["cwd"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = [Path(line) for line in result.stdout.split()]
    assert len(files) == len(modules) > 60 and all(file.is_relative_to(installed["site"]) for file in files)


def test_version_and_a_shipped_config_by_name_from_an_empty_folder(installed):
    assert run(installed, "--version").stdout.strip() == "emi 0.1.0"
    shown = run(installed, "config", "show", "stage1/tiny.yaml", "train.lr=0.1").stdout
    assert shown.startswith(f"# stage1 config {installed['site'] / 'emi/configs/stage1/tiny.yaml'}")
    config = yaml.safe_load(shown)
    assert config["optim"]["lr"] == 0.1 and config["run"]["name"] == "stage1-tiny"
    assert "stage2/vitl.yaml" in run(installed, "config", "list").stdout.split()


def test_the_checkout_beside_a_regular_install_runs_with_its_own_configs(installed):
    """`pip install .` (not editable), then `python -m emi.cli` from the checkout's root: the checkout's emi/
    comes first on the path, and it is a whole package, its configs included."""
    result = subprocess.run(
        [sys.executable, "-m", "emi.cli", "config", "show", "stage2/tiny.yaml"],
        cwd=installed["source"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# stage2 config {installed['source'] / 'emi/configs/stage2/tiny.yaml'}")


def test_shards_build_on_a_real_clip_from_the_wheel(installed, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = sorted(GRID.glob("*.mpg"))[0]
    shutil.copy(clip, videos)
    with open(tmp_path / "labels.csv", "w", newline="") as file:
        csv.writer(file).writerows([["Filename", *EMI_EMOTIONS], [clip.name, *[0.5] * len(EMI_EMOTIONS)]])
    run(
        installed,
        "shards",
        "build",
        "--videos",
        str(videos),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--out",
        "shards",
    )
    manifest = json.loads((installed["cwd"] / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 1 and manifest["num_frames"] == 15  # 3 s at 5 fps
    assert manifest["shards"][0]["keys"] == [clip.stem]


def test_tiny_stage1_trains_and_exports_from_the_wheel(installed):
    """`emi synth` -> `emi shards build` -> `emi train stage1` with the wheel's own tiny config, by its name, and
    ZeRO-2 (the DeepSpeed defaults come from the package), a few steps in one process."""
    data = installed["cwd"] / "synth"
    run(installed, "synth", "--out", str(data), "--clips", "8", "--seed", "3")
    run(
        installed,
        "shards",
        "build",
        "--videos",
        str(data / "videos"),
        "--labels",
        str(data / "labels.csv"),
        "--transcripts",
        str(data / "transcripts.csv"),
        "--frame-size",
        "64",
        "--out",
        "train-shards",
    )
    result = run(
        installed,
        "train",
        "stage1",
        "--config",
        "stage1/tiny.yaml",
        "data.train=train-shards",
        "data.val=null",
        "data.batch_size=4",
        "train.max_steps=2",
        "train.log_every=1",
        "train.strategy=zero2",
        "run.output_dir=runs",
    )
    run_dir = installed["cwd"] / "runs" / "stage1-tiny"
    log = (run_dir / "log.txt").read_text()
    assert "DEEPSPEED world=1" in log and "done: 2 steps" in log, log + result.stderr[-2000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["strategy"] == "zero2"
    for encoder in ("vision", "text", "audio"):
        assert (run_dir / "export" / encoder / "model.safetensors").stat().st_size > 0
    assert os.listdir(run_dir / "checkpoints")
