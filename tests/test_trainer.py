"""The training loop's parts on a tiny model in this process: one step (gradient accumulation gives the gradient of
the large batch, clipping clips), the scalar window reduced by name, and `fit` itself on a fake task: its schedule,
its log lines, skipped samples counted, the best export and the final one."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from emi.config import Stage2Config, load_config
from emi.engine.loop import Schedule, Task, fit
from emi.engine.step import train_step
from emi.engine.telemetry import ScalarWindow
from emi.errors import UsageError

from helpers import scalars

INPUTS = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, 1.0]])
TARGETS = torch.tensor([[1.0], [0.5], [-1.0], [2.0]])


def squared_error(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    error = (model(batch["x"]) - batch["y"]).pow(2).mean()
    return error, {"error": error.detach()}


def prepared(accumulate: int) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """A linear model with fixed weights and plain SGD (lr 1), prepared by an accelerator that accumulates."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    start = torch.cat([model.weight.detach().flatten(), model.bias.detach()]).clone()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    return accelerator, model, optimizer, start


def parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()])


def large_batch_gradient(start: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean squared error over all four samples at once, by hand."""
    weight, bias = start[:2].clone().requires_grad_(), start[2:].clone().requires_grad_()
    ((INPUTS @ weight[:, None] + bias - TARGETS).pow(2).mean()).backward()
    return torch.cat([weight.grad, bias.grad])


def test_two_accumulated_micro_batches_step_with_the_gradient_of_the_large_batch():
    accelerator, model, optimizer, start = prepared(accumulate=2)
    first = train_step(model, optimizer, {"x": INPUTS[:2], "y": TARGETS[:2]}, squared_error, accelerator, 1e9)
    assert not first.synced and first.grad_norm is None and torch.equal(parameters(model), start)  # no step yet
    second = train_step(model, optimizer, {"x": INPUTS[2:], "y": TARGETS[2:]}, squared_error, accelerator, 1e9)
    gradient = large_batch_gradient(start)
    assert second.synced and float(second.grad_norm) == pytest.approx(float(gradient.norm()), rel=1e-5)
    torch.testing.assert_close(parameters(model), start - gradient)  # SGD, lr 1: one step of the large batch


def test_clipping_scales_the_step_to_the_clip_norm_and_reports_the_norm_before():
    accelerator, model, optimizer, start = prepared(accumulate=1)
    result = train_step(model, optimizer, {"x": INPUTS, "y": TARGETS}, squared_error, accelerator, clip_grad=0.01)
    gradient = large_batch_gradient(start)
    assert float(result.grad_norm) == pytest.approx(float(gradient.norm()), rel=1e-5) and gradient.norm() > 0.01
    torch.testing.assert_close(parameters(model), start - gradient * 0.01 / gradient.norm())
    assert float((parameters(model) - start).norm()) == pytest.approx(0.01, rel=1e-4)


def test_the_window_means_each_scalar_by_name_and_sums_the_per_rank_numbers():
    accelerator = Accelerator(cpu=True)
    window = ScalarWindow()
    window.add(torch.tensor(1.0), {"a": torch.tensor(10.0), "b": torch.tensor(0.0)})
    window.add(torch.tensor(3.0), {"a": torch.tensor(20.0), "b": torch.tensor(4.0)})
    assert window.micro_batches == 2
    means, totals = window.reduce(accelerator, {"skipped": 5, "elapsed_s": 0.5})
    assert means == {"loss": 2.0, "a": 15.0, "b": 2.0} and totals == {"skipped": 5.0, "elapsed_s": 0.5}
    assert window.micro_batches == 0 and not window.values


def test_the_schedule_counts_whole_steps_and_refuses_an_accumulation_it_cannot_fill():
    train = load_config(Stage2Config, None, ["train.epochs=3", "train.grad_accum=2"]).train
    assert Schedule.of(7, train) == Schedule(steps_per_epoch=3, batches_per_epoch=6, total_steps=9)
    assert (
        Schedule.of(7, load_config(Stage2Config, None, ["train.epochs=3", "train.max_steps=4"]).train).total_steps == 4
    )
    with pytest.raises(UsageError, match="1 batches per epoch cannot fill one optimizer step with grad_accum=2"):
        Schedule.of(1, train)


class FakeData:
    """A DataInfo of three batches per epoch, of which it says it skipped 2 corrupt samples."""

    num_batches = 3

    def __init__(self) -> None:
        self.epochs: list[tuple[int, int]] = []
        self.dataloader = [{"x": INPUTS[i : i + 2], "y": TARGETS[i : i + 2]} for i in (0, 2, 1)]

    def set_epoch(self, epoch: int, skip_batches: int = 0, stretches=()) -> None:
        assert not stretches  # one layout throughout
        self.epochs.append((epoch, skip_batches))

    def stretch_batches(self, stretches=()) -> int:
        return self.num_batches

    def skipped(self) -> int:
        return 2


def test_fit_runs_the_schedule_logs_first_and_last_steps_counts_skips_and_exports(tmp_path):
    """Two epochs of three steps in this process, logging every 100 steps: step 1 and step 6 are logged anyway,
    each epoch says the samples it skipped, the evaluation runs after each epoch, the better one is exported to
    best/ with its metrics and the last weights to export/."""
    torch.manual_seed(0)
    model, data, exported = torch.nn.Linear(2, 1), FakeData(), []
    scores = iter([0.5, 0.25])

    def evaluate(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        return {"score": next(scores)}

    def export(state_dict: dict[str, torch.Tensor], folder) -> None:
        folder.mkdir(parents=True)
        torch.save(state_dict, folder / "weights.pt")
        exported.append(folder.name)

    config = load_config(
        Stage2Config,
        None,
        [
            "train.epochs=2",
            "train.log_every=100",
            "train.checkpoint_every=100",
            "data.batch_size=2",
            f"run.output_dir={tmp_path}",
            "run.name=fake",
        ],
    )
    task = Task(
        model=model, train_data=data, compute_loss=squared_error, evaluate=evaluate, export=export, best_metric="score"
    )
    result = fit(task, Accelerator(cpu=True), config, tmp_path / "fake")
    assert (result.state.step, result.state.epoch, result.state.best_metric, result.state.best_step) == (6, 2, 0.5, 3)
    assert data.epochs == [(0, 0), (1, 0)] and result.last_metrics == {"score": 0.25}
    assert exported == [".tmp-best", ".tmp-export"]
    assert json.loads((tmp_path / "fake" / "best" / "trainer.json").read_text()) == {
        "step": 3,
        "epoch": 1,
        "score": 0.5,
    }
    log = (tmp_path / "fake" / "log.txt").read_text()
    assert [step for step, _ in scalars(tmp_path / "fake", "train/loss")] == [1, 6]
    assert "epoch 1/2 step 1/6 loss" in log and "epoch 2/2 step 6/6 loss" in log
    assert "epoch 1/2: skipped 2 corrupt or unreadable samples" in log and "epoch 2/2 val: score 0.25" in log
    assert "epoch 1/2 val: score 0.5 (best)" in log and "done: 6 steps" in log
    assert sorted(path.name for path in (tmp_path / "fake" / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000006",
    ]
