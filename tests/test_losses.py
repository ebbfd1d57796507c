"""ContrastiveLoss and RegressionLoss against hand computations, and across 2 gloo ranks against the
single-process loss.

The 2-rank check runs this file as a script (`python tests/test_losses.py`) in two processes with
torchrun-style environment variables; each rank writes its losses and gradients to a safetensors file.
"""

import itertools
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from emi.models.losses import VA_STD_SCALE, ContrastiveLoss, RegressionLoss, regression_terms, va_confidence_weights

WORLD_SIZE, LOCAL_BATCH, DIM = 2, 3, 5
CONFIGS = list(itertools.product([False, True], repeat=2))  # (local_loss, gather_with_grad)
REGRESSION_WEIGHTS = {"mse": 1.0, "pearson": 1.0, "ccc": 0.5}


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same features and weights in every process: unit rows a, b [6, 5] and positive weights [6]."""
    generator = torch.Generator().manual_seed(7)
    n = WORLD_SIZE * LOCAL_BATCH
    a = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=1)
    weights = 0.2 + torch.rand(n, generator=generator, dtype=torch.float64)
    return a, b, weights


def hand_terms(a: list[list[float]], b: list[list[float]], scale: float) -> list[float]:
    """Per-sample (CE(a_i -> b) + CE(b_i -> a)) / 2, written out with exp and log."""
    n = len(a)

    def dot(u, v):
        return sum(x * y for x, y in zip(u, v))

    terms = []
    for i in range(n):
        a_to_b = -math.log(math.exp(scale * dot(a[i], b[i])) / sum(math.exp(scale * dot(a[i], b[j])) for j in range(n)))
        b_to_a = -math.log(math.exp(scale * dot(b[i], a[i])) / sum(math.exp(scale * dot(b[i], a[j])) for j in range(n)))
        terms.append((a_to_b + b_to_a) / 2)
    return terms


def hand_loss(a: list[list[float]], b: list[list[float]], scale: float, weights: list[float] | None) -> float:
    terms = hand_terms(a, b, scale)
    weights = weights or [1.0] * len(terms)
    mean_weight = sum(weights) / len(weights)
    return sum(w / mean_weight * t for w, t in zip(weights, terms)) / len(terms)


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("local_loss", [False, True])
def test_loss_equals_hand_computation(use_weights, local_loss):
    a, b, weights = global_batch()
    scale = 1 / 0.07
    loss = ContrastiveLoss(local_loss=local_loss)(
        a, b, torch.tensor(scale, dtype=torch.float64), weights if use_weights else None
    )
    expected = hand_loss(a.tolist(), b.tolist(), scale, weights.tolist() if use_weights else None)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weights_are_scale_free_and_shift_the_loss_towards_heavy_samples():
    a, b, _ = global_batch()
    scale = torch.tensor(5.0, dtype=torch.float64)
    loss_fn = ContrastiveLoss()
    plain = loss_fn(a, b, scale)
    assert loss_fn(a, b, scale, torch.full((6,), 0.3)).item() == pytest.approx(plain.item(), rel=1e-6)
    terms = hand_terms(a.tolist(), b.tolist(), 5.0)
    hardest = max(range(6), key=lambda i: terms[i])
    heavy = torch.ones(6)
    heavy[hardest] = 4.0
    assert loss_fn(a, b, scale, heavy).item() > plain.item()


def test_va_confidence_weights_values():
    sigma = torch.tensor([0.0, VA_STD_SCALE, 3 * VA_STD_SCALE, float("nan")])
    torch.testing.assert_close(va_confidence_weights(sigma, 4), torch.tensor([1.0, 0.5, 0.25, 1.0]))
    pairs = torch.tensor([[0.5 * VA_STD_SCALE, 1.5 * VA_STD_SCALE], [0.0, 0.0], [float("nan"), 0.2]])
    torch.testing.assert_close(va_confidence_weights(pairs, 3), torch.tensor([0.5, 1.0, 1.0]))
    torch.testing.assert_close(va_confidence_weights(None, 3), torch.ones(3))


@pytest.mark.parametrize(
    "va_std, message",
    [
        (torch.tensor([0.1, -0.2]), "finite and >= 0"),
        (torch.tensor([0.1, float("inf")]), "finite and >= 0"),
        (torch.tensor([0.1, 0.2, 0.3]), "shape \\[2\\]"),
    ],
)
def test_va_confidence_weights_rejects_bad_input(va_std, message):
    with pytest.raises(ValueError, match=message):
        va_confidence_weights(va_std, 2)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ContrastiveLoss()(torch.zeros(3, 4), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="weights must have shape \\[3\\]"):
        ContrastiveLoss()(torch.zeros(3, 4), torch.zeros(3, 4), 1.0, torch.ones(2))


def regression_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same [6, 3] predictions, labels (one missing) and mask in every process."""
    generator = torch.Generator().manual_seed(3)
    n = WORLD_SIZE * LOCAL_BATCH
    pred = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    labels = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    labels[4, 1] = float("nan")
    return pred, labels, ~labels.isnan()


def hand_regression_terms(pred: list[list[float]], labels: list[list[float]]) -> dict[str, float]:
    """mse, 1 - mean Pearson, 1 - mean CCC written out per column over the labelled rows (labels None: missing)."""
    columns = len(pred[0])
    squared, rhos, cccs = [], [], []
    for k in range(columns):
        rows = [(p[k], y[k]) for p, y in zip(pred, labels) if y[k] is not None]
        squared += [(p - y) ** 2 for p, y in rows]
        if len(rows) < 2:
            continue
        n = len(rows)
        mean_p, mean_y = sum(p for p, _ in rows) / n, sum(y for _, y in rows) / n
        cov = sum((p - mean_p) * (y - mean_y) for p, y in rows) / n
        var_p, var_y = sum((p - mean_p) ** 2 for p, _ in rows) / n, sum((y - mean_y) ** 2 for _, y in rows) / n
        rhos.append(cov / math.sqrt(var_p * var_y))
        cccs.append(2 * cov / (var_p + var_y + (mean_p - mean_y) ** 2))
    return {"mse": sum(squared) / len(squared), "pearson": 1 - sum(rhos) / len(rhos), "ccc": 1 - sum(cccs) / len(cccs)}


def test_regression_terms_equal_hand_computation():
    pred, labels, mask = regression_batch()
    rows = [[None if math.isnan(v) else v for v in row] for row in labels.tolist()]
    expected = hand_regression_terms(pred.tolist(), rows)
    got = regression_terms(pred, labels, mask)
    for name in ("mse", "pearson", "ccc"):
        assert got[name].item() == pytest.approx(expected[name], rel=1e-6), name
    loss, terms = RegressionLoss({"mse": 1.0, "pearson": 0.5})(pred, labels, mask)
    assert loss.item() == pytest.approx(expected["mse"] + 0.5 * expected["pearson"], rel=1e-6)
    assert set(terms) == {"mse", "pearson"}


def test_regression_terms_edge_cases():
    pred = torch.tensor([[0.2, 0.5], [0.4, 0.5], [0.9, 0.5]])
    labels = torch.tensor([[0.1, float("nan")], [0.3, 0.7], [0.8, float("nan")]])
    terms = regression_terms(pred, labels, ~labels.isnan())
    # column 1 has one labelled row: out of the correlation means, still in the MSE
    assert terms["pearson"].item() == pytest.approx(1 - 1.0, abs=1e-6)  # column 0: a perfect linear relation
    variance = 0.26 / 3  # of column 0's labels and predictions alike (deviations -0.3, -0.1, 0.4); covariance too
    assert terms["ccc"].item() == pytest.approx(1 - 2 * variance / (2 * variance + 0.1**2), rel=1e-5)
    assert terms["mse"].item() == pytest.approx((3 * 0.01 + 0.04) / 4, rel=1e-6)
    # a constant prediction has no correlation: finite, with finite gradients
    flat = torch.full((3, 2), 0.5, requires_grad=True)
    terms = regression_terms(flat, labels, ~labels.isnan())
    (terms["pearson"] + terms["ccc"]).backward()
    assert terms["pearson"].item() == pytest.approx(1.0) and torch.isfinite(flat.grad).all()


@pytest.mark.parametrize("weights", [{}, {"mse": 0.0}, {"mse": -1.0, "pearson": 2.0}, {"huber": 1.0}])
def test_regression_loss_refuses_bad_weights(weights):
    with pytest.raises(ValueError, match="loss weights"):
        RegressionLoss(weights)


def single_process_grads(
    a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, detach_other_than: int | None = None
) -> dict[str, torch.Tensor]:
    """Loss and grads of the global loss L, or, with detach_other_than=r, of rank r's local loss L_r with the
    other ranks' features held constant (a reference written with log_softmax, not with ContrastiveLoss)."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    rows = slice(None)
    cols_a, cols_b = a, b
    if detach_other_than is not None:
        rows = slice(detach_other_than * LOCAL_BATCH, (detach_other_than + 1) * LOCAL_BATCH)
        own = torch.zeros(len(a), 1, dtype=torch.bool)
        own[rows] = True
        cols_a, cols_b = torch.where(own, a, a.detach()), torch.where(own, b, b.detach())
    targets = torch.arange(len(a))[rows]
    log_p_ab = torch.log_softmax(scale * a[rows] @ cols_b.T, dim=1)
    log_p_ba = torch.log_softmax(scale * b[rows] @ cols_a.T, dim=1)
    per_sample = -(log_p_ab[torch.arange(len(targets)), targets] + log_p_ba[torch.arange(len(targets)), targets]) / 2
    loss = (weights[rows] / weights.mean() * per_sample).mean()
    loss.backward()
    return {"loss": loss.detach(), "a": a.grad, "b": b.grad, "scale": scale.grad}


def run_rank() -> None:
    """One rank of the 2-process check (entered via __main__)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    a, b, weights = global_batch()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for local_loss, gather_with_grad in CONFIGS:
        local_a, local_b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
        loss = ContrastiveLoss(local_loss, gather_with_grad)(local_a, local_b, scale, weights[rows])
        loss.backward()
        key = f"{int(local_loss)}{int(gather_with_grad)}"
        results.update(
            {
                f"{key}/loss": loss.detach(),
                f"{key}/a": local_a.grad,
                f"{key}/b": local_b.grad,
                f"{key}/scale": scale.grad,
            }
        )
    pred, labels, mask = regression_batch()
    local_pred = pred[rows].clone().requires_grad_()
    loss, _ = RegressionLoss(REGRESSION_WEIGHTS)(local_pred, labels[rows], mask[rows])
    loss.backward()
    results.update({"regression/loss": loss.detach(), "regression/pred": local_pred.grad})
    save_file(results, os.environ["RESULT_PATH"])
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("ranks")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(WORLD_SIZE),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "RESULT_PATH": str(out / f"rank{r}.safetensors")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD_SIZE)
    ]
    try:
        logs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:  # a hang fails the test instead of blocking it
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log
    return [load_file(out / f"rank{r}.safetensors") for r in range(WORLD_SIZE)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("local_loss, gather_with_grad", CONFIGS)
def test_two_ranks_match_single_process(rank_results, local_loss, gather_with_grad):
    a, b, weights = global_batch()
    reference = single_process_grads(a, b, weights)
    key = f"{int(local_loss)}{int(gather_with_grad)}"
    losses = [result[f"{key}/loss"] for result in rank_results]
    if local_loss:  # rank r holds L_r; L is their mean
        torch.testing.assert_close(sum(losses) / WORLD_SIZE, reference["loss"])
    else:
        for loss in losses:
            torch.testing.assert_close(loss, reference["loss"])
    # logit_scale is replicated, so DDP averages its gradient: the average is dL/ds in every configuration
    torch.testing.assert_close(sum(r[f"{key}/scale"] for r in rank_results) / WORLD_SIZE, reference["scale"])

    for rank, result in enumerate(rank_results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        if gather_with_grad:  # the autograd all-gather sums every rank's gradient into each slot
            expected = {name: WORLD_SIZE * reference[name][rows] for name in ("a", "b")}
        elif not local_loss:  # full loss on each rank; inputs reach it only through their own slot
            expected = {name: reference[name][rows] for name in ("a", "b")}
        else:  # L_r with the other ranks' features constant
            partial = single_process_grads(a, b, weights, detach_other_than=rank)
            torch.testing.assert_close(result[f"{key}/loss"], partial["loss"])
            expected = {name: partial[name][rows] for name in ("a", "b")}
        for name in ("a", "b"):
            torch.testing.assert_close(result[f"{key}/{name}"], expected[name])


def test_regression_loss_on_two_ranks_is_the_global_batch_loss(rank_results):
    """Each rank holds half the batch; both compute the loss of the whole batch, and DDP's average of their
    gradients (each world_size * dL/dpred on its own rows) is the single-process gradient."""
    pred, labels, mask = regression_batch()
    pred = pred.clone().requires_grad_()
    loss, _ = RegressionLoss(REGRESSION_WEIGHTS)(pred, labels, mask)
    loss.backward()
    for rank, result in enumerate(rank_results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["regression/loss"], loss.detach())
        torch.testing.assert_close(result["regression/pred"], WORLD_SIZE * pred.grad[rows])
    # and it is not what each rank's half alone would give
    half, _ = RegressionLoss(REGRESSION_WEIGHTS)(pred[:LOCAL_BATCH], labels[:LOCAL_BATCH], mask[:LOCAL_BATCH])
    assert abs(half.item() - loss.item()) > 1e-3


def test_local_loss_without_grad_gather_is_only_an_approximation(rank_results):
    # guards the reference above: the detached-negatives gradient really differs from the exact one
    a, b, weights = global_batch()
    exact = WORLD_SIZE * single_process_grads(a, b, weights)["a"][:LOCAL_BATCH]
    assert not torch.allclose(rank_results[0]["10/a"], exact)


if __name__ == "__main__":
    run_rank()
