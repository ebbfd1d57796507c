"""One launch of the resharding test (tests/test_reshard.py), on every rank.

    accelerate launch ... tests/reshard_worker.py STRATEGY RUN_DIR OUT.pt train|resume

`train`: three optimizer steps from a fixed seed, save_checkpoint (step 3), then one more step. `resume`: the
newest checkpoint of RUN_DIR loaded with load_checkpoint, then that same one more step. Both write to OUT.pt (rank
0) the full fp32 weights and Adam moments as saved or loaded, a draw of the torch RNG right after, the process
count the checkpoint was saved by, and the weights and moments after the one more step. Every step sees the same
global batch, split evenly over the ranks, so any world size computes the same update.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from emi.config import OptimSection, TrainSection
from emi.engine.checkpointer import checkpoints, load_checkpoint, save_checkpoint, saved_processes
from emi.engine.distributed import build_accelerator
from emi.engine.optim import build_optimizer
from emi.formats.checkpoint import TrainerState, create_run_id, read_run_id

GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks
SAVED_STEP = 3


def tiny_model() -> torch.nn.Module:
    """317 is prime, so no partition of these tensors is even; the middle weight (100 489 elements) is above
    ZeRO-3's persistence threshold (configs/deepspeed/zero3.json), so stage 3 partitions it."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 317), torch.nn.Tanh(), torch.nn.Linear(317, 317), torch.nn.Tanh(), torch.nn.Linear(317, 3)
    )


def batch_share(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(GLOBAL_BATCH, 5, generator=generator)
    targets = torch.randn(GLOBAL_BATCH, 3, generator=generator)
    share = GLOBAL_BATCH // world_size
    return inputs[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]


def full_state(accelerator, model, optimizer) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 value and Adam moments, keyed `<name>/<fp32|exp_avg|exp_avg_sq>`. Every rank
    calls this: under ZeRO-3 the values are gathered."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        relink_zero2_optimizer_state(optimizer.optimizer)
        fp32, moment = safe_get_full_fp32_param, safe_get_full_optimizer_state
    else:
        fp32, moment = torch.Tensor.detach, lambda param, key: optimizer.optimizer.state[param][key]
    state = {}
    for name, param in accelerator.unwrap_model(model).named_parameters():
        state[f"{name}/fp32"] = fp32(param).clone().float()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{key}"] = moment(param, key).clone().float()
    return state


def relink_zero2_optimizer_state(zero) -> None:
    """ZeRO-1/2 links the parameters to their Adam state after the first group's first step, before the other
    groups have any, so that safe_get_full_optimizer_state finds none for them: link again now that all have."""
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def predictions(model) -> torch.Tensor:
    """The model on the whole global batch: what the weights it computes with (not only the fp32 masters) give."""
    with torch.no_grad():
        return model(batch_share(0, 1)[0]).clone()


def train_step(accelerator, model, optimizer, inputs, targets) -> None:
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def main(strategy: str, run_dir: Path, out: Path, mode: str) -> None:
    train = TrainSection(strategy=strategy, clip_grad=0.0, mixed_precision="no")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # plain python: one process
    accelerator = build_accelerator(train, micro_batch_size=GLOBAL_BATCH // world_size)
    model = tiny_model()
    model, optimizer = accelerator.prepare(model, build_optimizer(model, OptimSection(lr=0.01)))
    inputs, targets = batch_share(accelerator.process_index, accelerator.num_processes)
    if mode == "train":
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            create_run_id(run_dir)
        accelerator.wait_for_everyone()
        for _ in range(SAVED_STEP):
            train_step(accelerator, model, optimizer, inputs, targets)
        path = save_checkpoint(accelerator, run_dir, TrainerState(step=SAVED_STEP), 2, read_run_id(run_dir))
    else:
        path = checkpoints(run_dir)[-1]
        state, _ = load_checkpoint(accelerator, path)
        assert state.step == SAVED_STEP, state
    result = {
        "saved_processes": saved_processes(path),
        "state": full_state(accelerator, model, optimizer),
        "outputs": predictions(model),
        "rng": accelerator.gather(torch.rand(1, 4)),  # a row per rank, in rank order
    }
    train_step(accelerator, model, optimizer, inputs, targets)
    result["next_state"] = full_state(accelerator, model, optimizer)
    if accelerator.is_main_process:
        torch.save(result, out)
    # Ends as emi's entry points do, with the process group left to the interpreter's exit: destroying it first
    # (accelerator.end_training) makes 3-process ZeRO-3 runs abort at exit now and then ("terminate called without an
    # active exception" in a native thread, after every result was written).
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
