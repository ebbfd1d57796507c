import math

import pytest
import torch

from emi.errors import UsageError
from emi.formats.fusion import FusionSpec
from emi.models.fusion import FusionModel, drop_modalities, gated_attention, segment_pool

DIMS = {"vision_dim": 12, "audio_dim": 10, "text_dim": 8}
SMALL = {
    **DIMS,
    "d_model": 16,
    "num_segments": 4,
    "tcn_layers": 2,
    "lstm_hidden": 8,
    "transformer_layers": 1,
    "transformer_heads": 2,
}
LENGTHS = [7, 3, 1, 5]
PRESENT = torch.tensor([[True, True, True], [True, False, True], [False, True, False], [True, True, False]])


def make_batch(lengths=LENGTHS, total=7, seed=0, present=PRESENT) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    batch = len(lengths)
    return {
        "vision": torch.randn(batch, total, DIMS["vision_dim"], generator=generator),
        "vision_mask": mask,
        "audio": torch.randn(batch, total, DIMS["audio_dim"], generator=generator),
        "audio_mask": mask.clone(),
        "text": torch.randn(batch, DIMS["text_dim"], generator=generator),
        "present": present.clone(),
    }


def spec(**arguments) -> FusionSpec:
    return FusionSpec.from_dict(arguments, "test")


def build(**overrides) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(spec(**{**SMALL, **overrides})).eval()


FUSIONS = ["qam", "mean", "concat", "xattn", "late"]


@pytest.fixture(scope="module", params=FUSIONS)
def model(request) -> FusionModel:
    return build(fusion=request.param)


def test_shapes_and_range(model):
    with torch.no_grad():
        out = model(**make_batch())
    assert out["pred"].shape == (4, 6)
    assert ((out["pred"] > 0) & (out["pred"] < 1)).all()
    if model.fusion.name == "concat":
        assert out["weights"] is None
    else:  # per segment, or per emotion ("late")
        assert out["weights"].shape == ((4, 6, 3) if model.fusion.name == "late" else (4, 4, 3))


def test_appended_padding_changes_nothing(model):
    batch = make_batch()
    padded = make_batch(total=12, seed=5)  # large garbage everywhere, then the valid part copied in
    for key in ("vision", "audio"):
        padded[key] = 100 * padded[key]
        padded[key][:, :7] = batch[key]
    padded["text"] = batch["text"]
    with torch.no_grad():
        expected, got = model(**batch)["pred"], model(**padded)["pred"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_absent_modality_features_have_no_effect(model):
    batch = make_batch()
    changed = {key: value.clone() for key, value in batch.items()}
    generator = torch.Generator().manual_seed(9)
    changed["vision"][2] = 100 * torch.randn(7, DIMS["vision_dim"], generator=generator)
    changed["audio"][1] = -50 * torch.randn(7, DIMS["audio_dim"], generator=generator)
    changed["text"][2:] = 1e3 * torch.randn(2, DIMS["text_dim"], generator=generator)
    with torch.no_grad():
        assert torch.equal(model(**changed)["pred"], model(**batch)["pred"])
        # and changing a present modality does change the prediction
        changed["text"][0, 0] += 1.0  # (a constant shift would vanish in the input LayerNorm)
        assert not torch.equal(model(**changed)["pred"], model(**batch)["pred"])


def test_betas_sum_to_one_over_present_and_zero_for_absent():
    batch = make_batch()
    batch["vision_mask"][3] = False  # no valid frame: vision absent although flagged present
    effective = PRESENT.clone()
    effective[3, 0] = False
    for fusion in ("qam", "mean"):
        with torch.no_grad():
            weights = build(fusion=fusion)(**batch)["weights"]
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 4))
        assert (weights[~effective[:, None, :].expand(-1, 4, -1)] == 0).all()
        assert (weights[effective[:, None, :].expand(-1, 4, -1)] > 0).all()
        if fusion == "mean":
            torch.testing.assert_close(weights[0], torch.full((4, 3), 1 / 3))
            torch.testing.assert_close(weights[1, :, 0], torch.full((4,), 0.5))
    with torch.no_grad():
        qam = build(fusion="qam")(**batch)["weights"]
    assert not torch.allclose(qam[0], torch.full((4, 3), 1 / 3))  # learned, not uniform


def test_modalities_outside_config_are_always_absent():
    model = build(modalities=("vision", "text"))
    assert not hasattr(model, "audio_projection") and set(model.fusion.quality) == {"vision", "text"}
    batch = make_batch()
    changed = {**batch, "audio": torch.randn(4, 7, DIMS["audio_dim"])}
    with torch.no_grad():
        out = model(**batch)
        assert torch.equal(model(**changed)["pred"], out["pred"])
    assert (out["weights"][..., 1] == 0).all()
    torch.testing.assert_close(out["weights"][2], torch.zeros(4, 3))  # clip 2 had only audio: nothing left


def test_clip_with_nothing_present_uses_empty_token():
    none = torch.zeros(4, 3, dtype=torch.bool)
    for fusion in FUSIONS:
        model = build(fusion=fusion)
        with torch.no_grad():
            out = model(**make_batch(present=none))
            other = model(**make_batch(present=none, seed=3))
        assert torch.isfinite(out["pred"]).all()
        torch.testing.assert_close(out["pred"], out["pred"][:1].expand(4, -1))
        assert torch.equal(out["pred"], other["pred"])
        if fusion != "concat":
            assert (out["weights"] == 0).all()


def test_segment_pool_hand_cases():
    x = torch.arange(16, dtype=torch.float32)[None, :, None].repeat(3, 1, 2)
    pooled = segment_pool(x, torch.tensor([5, 16, 10]), 8)
    # L=5 < M=8: segments [0,0) [0,1) [1,1) [1,2) [2,3) [3,3) [3,4) [4,5); empty [k,k) takes frame k
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([0.0, 0, 1, 1, 2, 3, 3, 4]))
    # L=16, M=8: pairs
    torch.testing.assert_close(pooled[1, :, 1], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5, 10.5, 12.5, 14.5]))
    pooled4 = segment_pool(x, torch.tensor([16, 10, 5]), 4)
    torch.testing.assert_close(pooled4[0, :, 0], torch.tensor([1.5, 5.5, 9.5, 13.5]))
    # L=10, M=4: boundaries 0, 2, 5, 7, 10
    torch.testing.assert_close(pooled4[1, :, 0], torch.tensor([0.5, 3.0, 5.5, 8.0]))
    # L=5, M=4: boundaries 0, 1, 2, 3, 5
    torch.testing.assert_close(pooled4[2, :, 0], torch.tensor([0.0, 1.0, 2.0, 3.5]))


def test_gated_attention_hand_case():
    h = torch.tensor([[[1.0, 2.0], [3.0, 1.0], [0.0, 4.0]]])
    gate = torch.nn.Linear(4, 2)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))  # alpha0 <- h_t[0], alpha1 <- delta[1]
        gate.bias.copy_(torch.tensor([0.0, 0.5]))
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    # deltas: [0, 0] (h_0 - h_-1 := 0), [2, -1], [-3, 3]
    expected = torch.tensor(
        [[[sigmoid(1) * 1, sigmoid(0.5) * 2], [sigmoid(3) * 3, sigmoid(-0.5) * 1], [sigmoid(0) * 0, sigmoid(3.5) * 4]]]
    )
    with torch.no_grad():
        torch.testing.assert_close(gated_attention(h, gate), expected)


def test_modality_dropout_never_drops_all():
    torch.manual_seed(0)
    present = torch.rand(2000, 3) < 0.7
    kept = drop_modalities(present, 0.9)
    assert not (kept & ~present).any()
    assert torch.equal(kept.any(1), present.any(1))
    assert (kept.sum(1) < present.sum(1)).any()
    dropped = present.sum() - kept.sum()
    assert 0.5 * present.sum() < dropped < present.sum()

    model = build(modality_dropout=0.9).train()
    out = model(**make_batch())
    torch.testing.assert_close(out["weights"].sum(-1), torch.ones(4, 4))
    assert (out["weights"][~PRESENT[:, None, :].expand(-1, 4, -1)] == 0).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_modality_dropout_applies_to_every_fusion(fusion):
    """In training a fusion sees exactly the modalities drop_modalities keeps (same random draw), never more."""
    model = build(fusion=fusion, dropout=0.0, modality_dropout=0.5)
    batch = make_batch()
    torch.manual_seed(3)
    kept = drop_modalities(PRESENT, 0.5)
    assert not torch.equal(kept, PRESENT)
    with torch.no_grad():
        torch.manual_seed(3)
        trained_on = model.train()(**batch)["pred"]
        model.eval()
        torch.testing.assert_close(trained_on, model(**{**batch, "present": kept})["pred"])
        assert not torch.allclose(trained_on, model(**batch)["pred"])


def test_late_fusion_weighs_each_present_modalitys_prediction_per_emotion():
    batch = make_batch()
    batch["vision_mask"][3] = False  # no valid frame: vision absent although flagged present
    effective = PRESENT.clone()
    effective[3, 0] = False
    model = build(fusion="late")
    with torch.no_grad():
        out = model(**batch)
    weights, experts = out["weights"], out["experts"]  # [B, 6, 3], [B, 3, 6]
    assert torch.equal(out["present"], effective)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 6))
    assert (weights[~effective[:, None, :].expand(-1, 6, -1)] == 0).all()
    assert (weights[effective[:, None, :].expand(-1, 6, -1)] > 0).all()
    assert not torch.allclose(weights[0], weights[0, :1].expand(6, -1))  # each emotion has its own weights
    torch.testing.assert_close(out["pred"], torch.einsum("bem,bme->be", weights, experts))
    # a clip with one modality is that modality's own prediction
    torch.testing.assert_close(out["pred"][2], experts[2, 1])
    # each expert sees its own modality only: changing the text changes the text expert alone
    changed = {**batch, "text": batch["text"] + torch.randn(4, DIMS["text_dim"])}
    with torch.no_grad():
        other = model(**changed)["experts"]
    assert torch.equal(other[:, :2], experts[:, :2]) and not torch.allclose(other[0, 2], experts[0, 2])


def test_xattn_turns_to_the_stand_in_of_an_absent_modality():
    model = build(fusion="xattn")
    with torch.no_grad():
        weights = model(**make_batch())["weights"]
    present = PRESENT[:, None, :].expand(-1, 4, -1)
    # absent: all attention on the stand-in (0 on real segments); present: some on the real segments, not all
    assert (weights[..., :2][~present[..., :2]] == 0).all()
    assert ((weights[..., :2][present[..., :2]] > 0) & (weights[..., :2][present[..., :2]] < 1)).all()
    assert torch.equal(weights[..., 2], present[..., 2].float())


@pytest.mark.parametrize(
    "overrides",
    [
        {"temporal": False, "fusion": "qam"},
        {"temporal": False, "fusion": "mean"},
        {"temporal": False, "fusion": "concat"},
        {"modalities": ("audio",), "fusion": "qam"},
        {"modalities": ("vision",), "fusion": "concat"},
        {"modalities": ("text",), "fusion": "mean", "temporal": False},
        {"modalities": ("vision", "audio"), "fusion": "xattn"},
        {"modalities": ("audio", "text"), "fusion": "xattn", "temporal": False},
        {"modalities": ("audio",), "fusion": "late"},
        {"modalities": ("vision", "text"), "fusion": "late", "temporal": False},
    ],
)
def test_switches_run(overrides):
    model = build(**overrides)
    if "vision" in model.modalities:
        assert (model.vision_tcn is None) == (not model.temporal)
    if "audio" in model.modalities:
        assert (model.audio_lstm is None) == (not model.temporal)
    with torch.no_grad():
        out = model(**make_batch())
    assert out["pred"].shape == (4, 6) and torch.isfinite(out["pred"]).all()
    if len(model.modalities) == 1 and out["weights"] is not None:
        index = ("vision", "audio", "text").index(model.modalities[0])
        has = PRESENT[:, index]
        assert (out["weights"][has][..., index] == 1).all() and (out["weights"][~has] == 0).all()


def test_bad_inputs_are_rejected():
    with pytest.raises(UsageError, match="model.fusion is .sum.; choose one of"):
        FusionModel(spec(**DIMS, fusion="sum"))
    with pytest.raises(UsageError, match="modalities"):
        FusionModel(spec(**DIMS, modalities=["vision", "depth"]))
    with pytest.raises(UsageError, match="odd"):
        FusionModel(spec(**DIMS, tcn_kernel=4))
    model = build()
    batch = make_batch()
    batch["vision_mask"][0, 2] = False
    with pytest.raises(ValueError, match="prefix"):
        model(**batch)
    with pytest.raises(ValueError, match="audio features"):
        model(**{**make_batch(), "audio": torch.zeros(4, 7, 3)})


@pytest.mark.parametrize("fusion", ["qam", "xattn"])
def test_tiny_model_overfits_and_every_parameter_learns(fusion):
    torch.manual_seed(0)
    model = FusionModel(spec(**{**SMALL, "dropout": 0.0, "fusion": fusion})).train()
    present = torch.tensor(
        [[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool
    )
    batch = make_batch(lengths=[7, 6, 5, 4, 7, 3, 2, 1], present=present, seed=11)
    target = torch.rand(8, 6, generator=torch.Generator().manual_seed(12))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(200):
        loss = torch.nn.functional.mse_loss(model(**batch)["pred"], target)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, f"no gradient reaches {silent}"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
