import numpy as np
import pytest
import torch

from emi import EMI_EMOTIONS
from emi.metrics import emi_report, mean_pearson, pearson, retrieval_metrics


def test_pearson_matches_numpy_corrcoef_on_random_data():
    rng = np.random.default_rng(0)
    target = rng.random((50, 6))
    pred = 0.5 * target + rng.normal(scale=0.3, size=(50, 6))
    expected = [np.corrcoef(pred[:, k], target[:, k])[0, 1] for k in range(6)]
    np.testing.assert_allclose(pearson(pred, target), expected, rtol=1e-12)
    assert mean_pearson(pred, target) == pytest.approx(np.mean(expected), rel=1e-12)


def test_pearson_accepts_float32_tensors_and_returns_float64():
    rng = np.random.default_rng(1)
    pred, target = rng.random((20, 3)).astype(np.float32), rng.random((20, 3)).astype(np.float32)
    rho = pearson(torch.from_numpy(pred), torch.from_numpy(target))
    assert rho.dtype == np.float64
    expected = [np.corrcoef(pred[:, k].astype(np.float64), target[:, k].astype(np.float64))[0, 1] for k in range(3)]
    np.testing.assert_allclose(rho, expected, rtol=1e-10)


def test_pearson_hand_cases_perfect_anti_constant():
    target = np.array([[0.1, 0.1, 0.1], [0.4, 0.4, 0.4], [0.9, 0.9, 0.9], [0.2, 0.2, 0.2]])
    pred = np.stack([2 * target[:, 0] + 1, -3 * target[:, 1], np.full(4, 0.3)], axis=1)
    rho = pearson(pred, target)
    np.testing.assert_allclose(rho, [1.0, -1.0, 0.0], atol=1e-12)
    assert pearson(target, pred)[2] == 0.0  # constant target column as well


def test_pearson_small_hand_case():
    # y = [1, 2, 3], y_hat = [1, 3, 2]: deviations [-1, 0, 1] and [-1, 1, 0], cov = 1/3, both variances 2/3
    rho = pearson(np.array([[1.0], [3.0], [2.0]]), np.array([[1.0], [2.0], [3.0]]))
    assert rho[0] == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (np.zeros((4, 2)), np.zeros((4, 3)), "one shape"),
        (np.zeros(4), np.zeros(4), "\\[N, K\\]"),
        (np.zeros((1, 2)), np.zeros((1, 2)), "at least 2 samples"),
        (np.array([[np.nan], [1.0]]), np.zeros((2, 1)), "pred: contains NaN"),
    ],
)
def test_pearson_rejects_bad_input(pred, target, message):
    with pytest.raises(ValueError, match=message):
        pearson(pred, target)


def test_emi_report_contents():
    target = np.array([[0.0, 0.2, 0.5, 0.1, 0.3, 0.9], [0.5, 0.4, 0.5, 0.3, 0.6, 0.1], [1.0, 0.6, 0.5, 0.2, 0.9, 0.5]])
    pred = target.copy()
    pred[:, 1] = target[::-1, 1]  # anti-correlated
    pred[:, 5] = pred[:, 5] + 0.1
    report = emi_report(pred, target)
    assert report["num_samples"] == 3
    assert report["pearson/Admiration"] == pytest.approx(1.0)
    assert report["pearson/Amusement"] == pytest.approx(-1.0)
    assert report["pearson/Determination"] == 0.0  # constant target
    assert report["pearson/Joy"] == pytest.approx(1.0)
    assert report["mean_pearson"] == pytest.approx((1 - 1 + 0 + 1 + 1 + 1) / 6)
    # squared errors: Amusement column (0.4^2 + 0 + 0.4^2), Joy column 3 * 0.1^2, over 18 entries
    assert report["mse"] == pytest.approx((0.16 + 0.16 + 0.03) / 18)
    assert set(report) == {f"pearson/{n}" for n in EMI_EMOTIONS} | {"mean_pearson", "mse", "num_samples"}


def test_emi_report_name_count_must_match():
    with pytest.raises(ValueError, match="2 names for 6 columns"):
        emi_report(np.random.rand(4, 6), np.random.rand(4, 6), names=("a", "b"))


def test_retrieval_metrics_constructed_case():
    # a = e_0..e_5. b[0..3] = a[0..3]; b[4] normalises to 0.371 e_4 + 0.928 e_5; b[5] = 3 e_5 (cosine ignores
    # the scale). So sim(a_i, b_j) = normalised b_j[i].
    a = np.eye(6)
    b = np.eye(6)
    b[4] = [0, 0, 0, 0, 0.4, 1.0]
    b[5] = 3 * np.eye(6)[5]
    metrics = retrieval_metrics(a, b)
    # a->b: a[4] scores b[4] 0.371, every other b 0; a[5] scores b[5] 1 above b[4] 0.928: all partners first.
    assert metrics["a2b_R@1"] == 1.0
    # b->a: b[4] scores a[5] (0.928) above a[4] (0.371): rank 1, inside top 5.
    assert metrics["b2a_R@1"] == pytest.approx(5 / 6)
    assert metrics["b2a_R@5"] == 1.0
    assert metrics["a2b_R@5"] == 1.0


def test_retrieval_metrics_ties_count_against():
    metrics = retrieval_metrics(torch.ones(4, 3), torch.ones(4, 3))
    assert metrics == {"a2b_R@1": 0.0, "a2b_R@5": 1.0, "b2a_R@1": 0.0, "b2a_R@5": 1.0}


def test_retrieval_metrics_random_permutation_recall_at_k():
    # b is a shuffled copy of a: partner of a[i] is b[i] only where the permutation fixes i.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 8))
    perm = np.array([0, 1, 2, 3, 4, 6, 5, 8, 9, 7])
    metrics = retrieval_metrics(a, a[perm])
    assert metrics["a2b_R@1"] == pytest.approx(5 / 10)
    assert metrics["b2a_R@1"] == pytest.approx(5 / 10)
