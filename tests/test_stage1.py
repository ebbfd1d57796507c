"""Stage I end to end on synthetic shards with tiny encoders, 2 processes on the CPU (gloo)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from emi.models.encoders import ContrastiveModel, audio_features, load_encoders, text_features, vision_features

from helpers import REPO, cpu_env, exported, free_port, launch, launch_command, scalars

STRATEGY_TYPE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def stage1_args(shards, out, *extra):
    return [
        "--config",
        "configs/stage1/tiny.yaml",
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        f"run.output_dir={out}",
        "data.batch_size=8",
        "train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def strategy_runs(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    for strategy in STRATEGY_TYPE:
        launch(
            "train/stage1.py",
            stage1_args(synthetic_shards, out, f"run.name={strategy}", f"train.strategy={strategy}", "train.epochs=6"),
        )
    launch(
        "train/stage1.py",
        stage1_args(
            synthetic_shards,
            out,
            "run.name=zero2_checkpointed",
            "train.strategy=zero2",
            "train.epochs=6",
            "train.activation_checkpointing=true",
        ),
    )
    return out


@pytest.mark.parametrize("strategy", list(STRATEGY_TYPE))
def test_strategy_trains_two_ranks_and_the_loss_falls(strategy_runs, strategy):
    run_dir = strategy_runs / strategy
    log = (run_dir / "log.txt").read_text()
    assert f"{STRATEGY_TYPE[strategy]} world=2" in log
    losses = [value for _, value in scalars(run_dir, "train/loss")]
    assert len(losses) == 18  # 48 clips / (8 x 2 ranks) = 3 steps per epoch, 6 epochs
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, losses
    for tag in (
        "train/loss_vision_text",
        "train/loss_audio_text",
        "train/temperature_vision_text",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "val/vision_text/a2b_R@1",
        "val/audio_text/b2a_R@5",
    ):
        assert scalars(run_dir, tag), tag
    assert [value for _, value in scalars(run_dir, "val/num_samples")] == [16.0] * 6  # each val clip once


def test_step_telemetry_is_logged_with_plausible_values(strategy_runs):
    run_dir = strategy_runs / "zero2"
    step_s, data_wait, compute = (
        dict(scalars(run_dir, f"train/{name}")) for name in ("step_s", "data_wait_s", "compute_s")
    )
    assert sorted(step_s) == list(range(1, 19))
    for step, seconds in step_s.items():
        assert 0 <= data_wait[step] <= seconds and compute[step] == pytest.approx(seconds - data_wait[step], abs=1e-4)
    share = [value for _, value in scalars(run_dir, "train/data_wait_share")]
    assert all(0 <= value <= 1 for value in share)
    samples_per_s = dict(scalars(run_dir, "train/samples_per_s"))
    assert all(samples_per_s[step] == pytest.approx(16 / seconds, rel=1e-3) for step, seconds in step_s.items())
    # model FLOPs of the tiny config per training sample (emi.models.flops) times samples/s per device
    flops = [value for _, value in scalars(run_dir, "train/tflops_per_device")]
    assert len(flops) == 18 and all(value > 0 for value in flops)
    assert [value for _, value in scalars(run_dir, "train/skipped_samples")] == [0.0] * 18
    assert not scalars(run_dir, "train/mfu") and not scalars(run_dir, "train/peak_memory_gib")  # CPU: no peak
    assert "data_wait_s" in (run_dir / "log.txt").read_text()


def test_activation_checkpointing_under_zero2_on_two_ranks_trains_as_without(strategy_runs):
    """Same seed, data and fp32 math: recomputing the activations (dropout masks included) changes no number."""
    plain, checkpointed = strategy_runs / "zero2", strategy_runs / "zero2_checkpointed"
    assert "activation checkpointing in text, vision, audio" in (checkpointed / "log.txt").read_text()
    losses = [value for _, value in scalars(plain, "train/loss")]
    assert [value for _, value in scalars(checkpointed, "train/loss")] == pytest.approx(losses, rel=1e-5)
    reference, weights = exported(plain), exported(checkpointed)
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.allclose(weights[name], tensor, atol=1e-5, rtol=1e-4), name


def test_zero_exports_match_ddp(strategy_runs):
    """Same seed, data and fp32 math: ZeRO-2/3 (partitioned, gathered on export) end where DDP ends."""
    reference = exported(strategy_runs / "ddp")
    for strategy in ("zero2", "zero3"):
        weights = exported(strategy_runs / strategy)
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.allclose(weights[name], tensor, atol=1e-4, rtol=1e-3), (strategy, name)


def kill_job_tree(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a scheduler does (torchrun puts ranks in new sessions)."""
    processes = [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    job.wait()


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(strategy_runs, synthetic_shards):
    """Kill the whole job (launcher and ranks) with SIGKILL after a mid-epoch checkpoint, restart it with
    --resume latest, and end bit-identical to the uninterrupted ZeRO-2 run of the same config."""
    args = stage1_args(
        synthetic_shards,
        strategy_runs,
        "run.name=killed",
        "train.strategy=zero2",
        "train.epochs=6",
        "train.checkpoint_every=2",
        "train.keep_last=20",
    )
    run_dir = strategy_runs / "killed"
    with open(strategy_runs / "killed.stderr", "w") as stderr:
        job = subprocess.Popen(
            launch_command("train/stage1.py", args),
            cwd=REPO,
            env=cpu_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        mid_epoch = run_dir / "checkpoints" / "step-00000008"  # epoch 2, batch 2 of 3
        deadline = time.monotonic() + 300
        while not (mid_epoch / "trainer_state.json").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_job_tree(job)
    log = (strategy_runs / "killed.stderr").read_text()[-4000:]
    assert (mid_epoch / "trainer_state.json").exists(), f"no step-8 checkpoint (exit {job.returncode}):\n{log}"
    assert not (run_dir / "export").exists()
    # On a loaded machine the kill can land a few steps after step 8: drop the later checkpoints so the restart
    # resumes mid-epoch, as if the kill had come right after step 8.
    for later in (run_dir / "checkpoints").glob("step-*"):
        if later.name > mid_epoch.name:
            shutil.rmtree(later)

    launch("train/stage1.py", [*args, "--resume", "latest"])
    log = (run_dir / "log.txt").read_text()
    assert "resumed from" in log and "step 18/18" in log
    assert re.search(r"resumed from .*step-00000008: epoch 3 step 8 \(batch 2 of the epoch\)", log), log
    reference, resumed = exported(strategy_runs / "zero2"), exported(run_dir)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    steps = [step for step, _ in scalars(run_dir, "train/loss")]
    assert steps == list(range(1, 19))  # continuous: the resumed run logs where the killed one stopped


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one_with_the_uninterrupted_weights(
    strategy_runs, synthetic_shards
):
    """Cut a ZeRO partition of the newest checkpoint in half, half-write the trainer state of the one before, give
    the next one's checkpoint.json a file record without its keys and change one character of the run id in the
    next: --resume latest names all four, moves them aside, resumes from the newest intact one of this run and ends
    bit-identical to the uninterrupted ZeRO-2 run."""
    args = stage1_args(
        synthetic_shards,
        strategy_runs,
        "run.name=damaged",
        "train.strategy=zero2",
        "train.epochs=6",
        "train.checkpoint_every=2",
        "train.keep_last=20",
    )
    run_dir, root = strategy_runs / "damaged", strategy_runs / "damaged" / "checkpoints"
    launch("train/stage1.py", [*args, "train.max_steps=8"])  # checkpoints at steps 2, 3, 4, 6 and 8
    partition = sorted((root / "step-00000008").rglob("*optim_states.pt"))[0]
    state = root / "step-00000006" / "trainer_state.json"
    sizes = partition.stat().st_size, state.stat().st_size
    partition.write_bytes(partition.read_bytes()[: sizes[0] // 2])
    state.write_text(state.read_text()[: sizes[1] // 2])
    record = json.loads((root / "step-00000004" / "checkpoint.json").read_text())
    record["files"]["trainer_state.json"] = {"size": 1}
    (root / "step-00000004" / "checkpoint.json").write_text(json.dumps(record))
    record = json.loads((root / "step-00000003" / "checkpoint.json").read_text())
    run_id, changed = record["run_id"], record["run_id"][:-1] + ("0" if record["run_id"][-1] != "0" else "1")
    (root / "step-00000003" / "checkpoint.json").write_text(json.dumps({**record, "run_id": changed}))

    launch("train/stage1.py", [*args, "--resume", "latest"])
    log = (run_dir / "log.txt").read_text()
    name = partition.relative_to(root / "step-00000008").as_posix()
    assert (
        f"warning: checkpoint {root / 'step-00000008'} is damaged ({name}: {sizes[0] // 2} bytes, {sizes[0]} "
        "when written); moved aside to damaged-step-00000008"
    ) in log
    assert (
        f"warning: checkpoint {root / 'step-00000006'} is damaged (trainer_state.json: {sizes[1] // 2} bytes, "
        f"{sizes[1]} when written); moved aside to damaged-step-00000006"
    ) in log
    assert (
        f"warning: checkpoint {root / 'step-00000004'} is damaged (checkpoint.json: file 'trainer_state.json' "
        "has a malformed record {'size': 1}); moved aside to damaged-step-00000004"
    ) in log
    assert (
        f"warning: checkpoint {root / 'step-00000003'} is another run's (written by run {changed}, not by this "
        f"run {run_id}; --trust-checkpoint resumes it anyway); moved aside to damaged-step-00000003"
    ) in log
    assert f"resumed from {root / 'step-00000002'}: epoch 1 step 2 (batch 2 of the epoch)" in log
    reference, resumed = exported(strategy_runs / "zero2"), exported(run_dir)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)


def test_a_checkpoint_of_another_run_is_refused_unless_trusted(strategy_runs, synthetic_shards):
    """Resuming unpickles DeepSpeed's states: another run's checkpoint needs --trust-checkpoint (exit 2 without)."""
    foreign = sorted((strategy_runs / "zero2" / "checkpoints").glob("step-*"))[-1]
    args = stage1_args(
        synthetic_shards,
        strategy_runs,
        "run.name=adopter",
        "train.strategy=zero2",
        "train.epochs=7",
        "--resume",
        str(foreign),
    )
    refused = subprocess.run(
        [sys.executable, str(REPO / "train/stage1.py"), *args],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )  # one process: its own exit code
    assert refused.returncode == 2, refused.stderr[-4000:]
    assert f"error: {foreign} was written by run " in refused.stderr and "--trust-checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr
    launch("train/stage1.py", [*args, "--trust-checkpoint"])
    log = (strategy_runs / "adopter" / "log.txt").read_text()
    assert f"resumed from {foreign}: epoch 7 step 18" in log and "done: 21 steps" in log


def test_exported_encoders_reload_and_give_the_trained_models_outputs(strategy_runs, synthetic_shards):
    """The export (from_pretrained folders) against the model in the run's last resumable checkpoint."""
    run_dir = strategy_runs / "ddp"
    spec = yaml.safe_load((REPO / "configs/stage1/tiny.yaml").read_text())["model"]
    trained = ContrastiveModel(spec["vision"], spec["text"], spec["audio"], spec["embed_dim"])
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    trained.load_state_dict(load_file(str(last / "model.safetensors")))
    trained.eval()
    loaded = load_encoders(run_dir / "export")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64, generator=generator)
    waves = torch.randn(2, 16000, generator=generator)
    tokens = loaded["tokenizer"](
        ["Joy (Intensity: High)", "Neutral (Intensity: Low)"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.equal(vision_features(loaded["vision"], pixels), vision_features(trained.vision, pixels))
        assert torch.equal(
            text_features(loaded["text"], tokens["input_ids"], tokens["attention_mask"]),
            text_features(trained.text, tokens["input_ids"], tokens["attention_mask"]),
        )
        mask = torch.ones_like(waves, dtype=torch.long)
        assert torch.equal(audio_features(loaded["audio"], waves, mask), audio_features(trained.audio, waves, mask))


def test_runs_under_torchrun_and_as_one_plain_process(synthetic_shards, tmp_path):
    common = stage1_args(synthetic_shards, tmp_path, "train.max_steps=2", "train.epochs=1")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "train/stage1.py"),
        *common,
        "run.name=torchrun",
        "train.strategy=zero3",
    ]
    plain = [
        sys.executable,
        str(REPO / "train/stage1.py"),
        *common,
        "run.name=plain",
        "train.strategy=ddp",
        "model.pairs=[audio_text]",
    ]
    for command in (torchrun, plain):
        result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    for name, expected in (("torchrun", "DEEPSPEED world=2"), ("plain", "NO world=1")):
        log = (tmp_path / name / "log.txt").read_text()
        assert expected in log and "done: 2 steps" in log
        assert (tmp_path / name / "export" / "text" / "model.safetensors").is_file()
    assert not (tmp_path / "plain" / "export" / "vision").exists()  # only the audio-text pair was trained


def test_unknown_config_key_fails_with_exit_code_2(synthetic_shards, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train/stage1.py"), *stage1_args(synthetic_shards, tmp_path, "train.epochz=1")],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "unknown key 'train.epochz'" in result.stderr and "configs/stage1/tiny.yaml" in result.stderr


ZERO2_ALIGNMENT_PROBE = """
from accelerate.utils import DistributedType
from emi.config import OptimSection, Stage1Config, TrainSection, load_config
from emi.engine.distributed import build_accelerator
from emi.engine.optim import build_optimizer
from emi.stages.stage1 import build_model
model = build_model(load_config(Stage1Config, "configs/stage1/tiny.yaml"))
accelerator = build_accelerator(TrainSection(strategy="zero2"), 2)
model, _ = accelerator.prepare(model, build_optimizer(model, OptimSection()))
assert accelerator.distributed_type == DistributedType.DEEPSPEED
print("misaligned:", [n for n, p in model.named_parameters() if p.data_ptr() % 16 and p.numel() % 8 == 0])
"""


def test_zero2_keeps_the_parameters_16_byte_aligned():
    """ZeRO-2 views the parameters into one flat buffer per group: the logit scale must not misalign the biases
    (every tensor of a multiple of 8 elements starts on a 16-byte boundary)."""
    result = subprocess.run(
        [sys.executable, "-c", ZERO2_ALIGNMENT_PROBE],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "misaligned: []" in result.stdout, result.stdout[-2000:]


def test_compiled_training_resumes_and_exports_plain_names_that_load_with_from_pretrained(synthetic_shards, tmp_path):
    """train.compile=true: the compiled regions are in place, so checkpoints and exports keep the model's own names.
    aot_eager traces forward and backward as inductor does, without generating kernels (compile time on the CPU)."""
    args = [
        sys.executable,
        "-m",
        "emi.stages.stage1",
        *stage1_args(
            synthetic_shards,
            tmp_path,
            "run.name=compiled",
            "data.val=null",
            "train.strategy=ddp",
            "train.compile=true",
            "train.compile_backend=aot_eager",
            "train.epochs=1",
        ),
    ]
    for max_steps, resume in ((2, []), (4, ["--resume", "latest"])):
        result = subprocess.run(
            [*args, f"train.max_steps={max_steps}", *resume],
            cwd=REPO,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "compiled"
    log = (run_dir / "log.txt").read_text()
    assert log.count("torch.compile of 23 regions (mode default, aot_eager)") == 2
    assert re.search(r"resumed from .*step-00000002: epoch 1 step 2", log) and "done: 4 steps" in log
    assert [step for step, _ in scalars(run_dir, "train/loss")] == [1, 2, 3, 4]
    spec = yaml.safe_load((REPO / "configs/stage1/tiny.yaml").read_text())["model"]
    names = set(ContrastiveModel(spec["vision"], spec["text"], spec["audio"], spec["embed_dim"]).state_dict())
    trained = load_file(str(run_dir / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert set(trained) == names  # no _orig_mod. anywhere
    loaded = load_encoders(run_dir / "export")  # from_pretrained folders
    for encoder in ("vision", "text", "audio"):
        state = loaded[encoder].state_dict()
        assert state.keys() == {name.removeprefix(f"{encoder}.") for name in names if name.startswith(f"{encoder}.")}
        assert all(torch.equal(tensor, trained[f"{encoder}.{name}"]) for name, tensor in state.items()), encoder
