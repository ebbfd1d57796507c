"""The `emi` command line as a newcomer meets it: --version, every command's --help, fast."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import pytest

from emi import __version__
from emi.cli import build_parser, main

from helpers import REPO, cpu_env


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, its parser) of every command and subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"emi {__version__}"


def test_every_option_of_every_command_says_what_it_is_and_its_default():
    found = dict(commands(build_parser()))
    assert {
        ("synth",),
        ("shards", "build"),
        ("features", "extract"),
        ("evaluate",),
        ("predict",),
        ("train",),
        ("sweep",),
        ("config", "show"),
        ("config", "list"),
    } <= set(found)
    for path, parser in found.items():
        text = " ".join(parser.format_help().split())  # wrapped lines joined
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"emi {' '.join(path)}: {action.dest} has no help"
            default = action.default
            if not action.required and default not in (None, "", []) and not isinstance(default, bool):
                assert f"default: {default}" in text or "default" in action.help, (path, action.dest)
    synth = found[("synth",)].format_help()
    assert "(default: 0)" in synth and "(default: 0.0)" in synth  # --seed, --corrupt-frac


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "stage1", "--help"],
        ["shards", "build", "--help"],
        ["predict", "--help"],
        ["config", "show", "--help"],
    ],
)
def test_help_answers_before_torch_is_imported(argv):
    """--help parses and prints before anything heavy (torch, transformers) is imported: it answers at once."""
    probe = (
        "import sys\nfrom emi.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\nprint('heavy:', sorted(m for m in ('torch', 'transformers', "
        "'accelerate', 'deepspeed') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: emi" in result.stdout and result.stdout.strip().endswith("heavy: []"), result.stdout[-500:]


def test_make_clean_removes_what_the_demo_wrote_and_keeps_the_placeholders(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path)
    written = [
        "data/shards/train/train-000000.tar",
        "data/shards/val/manifest.json",
        "data/features/train/x.tar",
        "data/synth/train/videos/a.mp4",
        "runs/stage1-tiny/log.txt",
        "logs/emi-stage1-7.out",
    ]
    for name in ["data/shards/.gitkeep", "logs/.gitkeep", *written]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    left = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file())
    assert left == ["Makefile", "data/shards/.gitkeep", "logs/.gitkeep"]
