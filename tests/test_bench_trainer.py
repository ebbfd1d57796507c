"""The trainer benchmark: its parts on toy inputs (fast), and a quick run of the real thing (slow). Numbers are
checked for consistency, never for speed."""

import statistics
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from benchmarks import bench_trainer, harness
from emi.config import OptimSection
from emi.engine.optim import build_optimizer, sgdr_lr


def test_in_memory_data_times_every_request_and_skips_like_the_loader():
    batch = {"x": torch.ones(2)}
    data = bench_trainer.InMemoryData(batch, num_batches=5, batch_size=2)
    data.set_epoch(0, skip_batches=2)
    assert [b is batch for b in data.dataloader] == [True] * 3
    assert len(data.request_times) == 4 and data.request_times == sorted(data.request_times)


def test_block_means_skip_warmup_and_average_each_block():
    times = [0.0, 5.0, 6.0, 8.0, 11.0, 15.0]  # steps of 5, 1, 2, 3, 4 s
    assert bench_trainer.block_means(times, warmup=1, blocks=2, block_steps=2) == [1.5, 3.5]
    with pytest.raises(ValueError, match="timed steps"):
        bench_trainer.block_means(times, warmup=2, blocks=2, block_steps=2)


def toy_task(steps: int):
    """A linear model and its optimizer, a loss whose gradients are far above the clipping norm, `steps` batches."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optim = OptimSection(lr=0.1, min_lr=0.01, restart_epochs=1)

    def compute_loss(model, batch):
        return 1000 * model(batch["x"]).pow(2).mean(), {}

    config = SimpleNamespace(optim=optim, train=SimpleNamespace(clip_grad=1.0))
    data = bench_trainer.InMemoryData({"x": torch.ones(8, 4)}, steps, batch_size=8)
    return model, build_optimizer(model, optim), compute_loss, data, config


def clip_norms(monkeypatch) -> list[float]:
    """The max norm of every call of torch's gradient clipping from now on."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    return norms


def test_plain_loop_clips_and_follows_emis_schedule_every_step(monkeypatch):
    model, optimizer, compute_loss, data, config = toy_task(steps=5)
    norms = clip_norms(monkeypatch)
    bench_trainer.plain_loop(model, optimizer, compute_loss, data, config, torch.device("cpu"))
    assert norms == [1.0] * 5 and len(data.request_times) == 6
    last_lr = sgdr_lr(4, config.optim, steps_per_epoch=5)  # one epoch of the data's batches, as fit counts it
    assert last_lr < config.optim.lr and [group["lr"] for group in optimizer.param_groups] == [last_lr] * 2
    assert model.weight.grad is None


def test_floor_loop_trains_without_clipping_or_schedule(monkeypatch):
    model, optimizer, compute_loss, data, config = toy_task(steps=3)
    before = model.weight.detach().clone()
    norms = clip_norms(monkeypatch)
    bench_trainer.floor_loop(model, optimizer, compute_loss, data)
    assert norms == [] and len(data.request_times) == 4
    assert [group["lr"] for group in optimizer.param_groups] == [config.optim.lr] * 2
    assert not torch.equal(model.weight, before) and model.weight.grad is None  # stepped, then zero_grad


def measured(step_s: dict[str, list[float]]) -> dict[str, list[dict]]:
    return {name: [{"step_s": s, "timed_steps": 30} for s in values] for name, values in step_s.items()}


def test_ratios_are_the_median_of_the_per_round_step_time_ratios_and_met_follows_the_target():
    rounds = measured({"fit": [0.40, 0.36, 0.60], "plain": [0.32, 0.36, 0.40], "floor": [0.30, 0.30, 0.30]})
    result = bench_trainer.summarise(rounds)
    fit_over_plain = result["ratios"]["fit_over_plain"]
    assert fit_over_plain == {"median": pytest.approx(1.25), "low": pytest.approx(1.0), "high": pytest.approx(1.5)}
    assert result["ratios"]["plain_over_floor"]["median"] == pytest.approx(statistics.median([32 / 30, 1.2, 4 / 3]))
    assert result["step_ms"]["fit"]["median"] == pytest.approx(400)
    assert result["met"] is False  # 1.25 > 1.15
    assert bench_trainer.summarise(measured({"fit": [0.33], "plain": [0.3], "floor": [0.3]}))["met"] is True


FIT_RAW = "\n".join(
    [
        "main;measure;fit (emi/engine/loop.py:113);start (emi/engine/loop.py:147) 50",  # not a step
        "fit;train_epoch (emi/engine/loop.py:226);train_step;compute_loss (emi/stages/stage1.py:119) 30",
        "fit;train_epoch (emi/engine/loop.py:226);train_step;Tensor.backward (torch/_tensor.py:631) 55",
        "fit;train_epoch (emi/engine/loop.py:226);Tensor.backward (torch/_tensor.py:631);"
        "hook (deepspeed/runtime/zero/stage_1_and_2.py:1456) 5",
        "fit;train_epoch (emi/engine/loop.py:226);DeepSpeedEngine.step (deepspeed/runtime/engine.py:3615);"
        "DeepSpeedZeroOptimizer.step (deepspeed/runtime/zero/stage_1_and_2.py:3039) 8",
        "fit;train_epoch (emi/engine/loop.py:223);sgdr_lr (emi/engine/optim.py:20) 1",
        "fit;train_epoch (emi/engine/loop.py:236);whatever (accelerate/accelerator.py:1) 1",
    ]
)
PLAIN_RAW = "\n".join(
    [
        "main;measure (bench_trainer.py:190);build (bench_trainer.py:160) 40",  # not a step
        "main;plain_loop (bench_trainer.py:112);compute_loss (emi/stages/stage1.py:119) 30",
        "main;plain_loop (bench_trainer.py:113);Tensor.backward (torch/_tensor.py:631) 60",
        "main;plain_loop (bench_trainer.py:114);_no_grad_wrapper (torch/nn/utils/clip_grad.py:42) 2",
        "main;plain_loop (bench_trainer.py:115);wrapper (torch/optim/optimizer.py:533) 8",
    ]
)
OPTIMIZER, HOOKS = list(bench_trainer.PROFILE_CATEGORIES)[:2]


def test_profile_shares_count_only_the_loop_and_put_each_sample_in_its_first_category():
    fit = bench_trainer.profile_shares(FIT_RAW, bench_trainer.LOOP_FRAMES["fit"])
    assert fit["samples"] == 100 and sum(fit["shares"].values()) == pytest.approx(1)
    assert fit["shares"]["forward and loss"] == pytest.approx(0.30)
    assert fit["shares"]["backward: autograd"] == pytest.approx(0.55)
    assert fit["shares"][HOOKS] == pytest.approx(0.05)  # the hooks, not autograd that runs them
    assert fit["shares"][OPTIMIZER] == pytest.approx(0.08)  # DeepSpeed's step, not its ZeRO code
    assert fit["shares"]["learning rate: sgdr_lr"] == pytest.approx(0.01)
    assert fit["shares"][bench_trainer.REST] == pytest.approx(0.01)
    plain = bench_trainer.profile_shares(PLAIN_RAW, bench_trainer.LOOP_FRAMES["plain"])
    assert plain["samples"] == 100 and plain["shares"][OPTIMIZER] == pytest.approx(0.08)
    assert plain["shares"]["gradient clipping (plain loop)"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="no py-spy sample"):
        bench_trainer.profile_shares(PLAIN_RAW, bench_trainer.LOOP_FRAMES["fit"])


def fake_result(profiles: dict) -> dict:
    return {
        **bench_trainer.summarise(measured({"fit": [0.4, 0.5], "plain": [0.4, 0.4], "floor": [0.3, 0.3]})),
        "profiles": profiles,
        "load": "0.50 before, 0.60 after",
        "sizes": asdict(bench_trainer.Sizes()),
        "batch_size": 16,
        "clip_grad": 1.0,
        "cpu_cores": 2,
    }


PROFILES = {
    "fit": {**bench_trainer.profile_shares(FIT_RAW, bench_trainer.LOOP_FRAMES["fit"]), "step_ms": 400.0},
    "plain": {**bench_trainer.profile_shares(PLAIN_RAW, bench_trainer.LOOP_FRAMES["plain"]), "step_ms": 300.0},
}


@pytest.mark.parametrize("profiles", [{}, {"fit": {"skipped": "py-spy is not installed"}}, PROFILES])
def test_section_and_summary_say_the_ratios_the_verdict_and_why(profiles):
    text = bench_trainer.section(fake_result(profiles))
    assert "fit / plain loop: **1.12 (1.00-1.25)**" in text and harness.verdict(True) in text
    assert "fit / floor: 1.50 (1.33-1.67)" in text and "plain loop / floor: 1.33 (1.33-1.33)" in text
    assert ("Not profiled" in text) == (profiles != PROFILES)
    if profiles == PROFILES:  # ms per step = share x the process's step time
        assert "| backward: autograd | 220.0 (55.0 %) | 180.0 (60.0 %) |" in text
        assert "| step (samples) | 400.0 (100) | 300.0 (100) |" in text
    assert bench_trainer.summary(fake_result(profiles)) == [
        ["trainer step time, fit (ZeRO-2) / plain loop doing the same work", "1.12 (1.00-1.25)", "<= 1.15", "yes"]
    ]


@pytest.mark.slow  # a minute or two of fresh processes: `make test-slow`; `make bench` runs it for real
def test_quick_run_interleaves_fresh_processes_doing_the_same_steps(tmp_path):
    result = bench_trainer.run(tmp_path, quick=True, profile=True)
    sizes = bench_trainer.QUICK
    rounds = result["rounds"]["rounds"]
    assert len(rounds) == sizes.rounds and result["sizes"]["rounds"] == sizes.rounds
    for measured_round in rounds:  # every contender timed the same steps of the same batch
        assert {m["units"] for m in measured_round.values()} == {float(sizes.timed_steps)}
    per_round = result["measured"]
    for name, baseline in (("fit", "plain"), ("fit", "floor"), ("plain", "floor")):
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(per_round[name], per_round[baseline])]
        assert result["ratios"][f"{name}_over_{baseline}"]["median"] == pytest.approx(statistics.median(ratios))
    for runs in per_round.values():
        assert all(run["step_s"] == statistics.median(run["block_step_s"]) > 0 for run in runs)
    assert result["met"] == (result["ratios"]["fit_over_plain"]["median"] <= bench_trainer.TARGET)
    assert (tmp_path / "runs" / "0" / "fit" / "export" / "vision" / "config.json").is_file()  # fit ran to the end
    for profile in result["profiles"].values():
        assert "skipped" in profile or sum(profile["shares"].values()) == pytest.approx(1)
    assert set(result["profiles"]) == set(bench_trainer.PROFILED)
    text = bench_trainer.section(result)
    assert f"{sizes.rounds} rounds" in text and "fit / plain loop" in text
