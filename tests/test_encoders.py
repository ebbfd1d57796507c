import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel, CLIPConfig, CLIPModel, CLIPVisionModel, ViTModel, Wav2Vec2Model

from emi.errors import UsageError
from emi.models.encoders import (
    ContrastiveModel,
    audio_features,
    audio_frame_features,
    build_encoder,
    build_tokenizer,
    bundled_vocab,
    export_encoders,
    image_processing,
    load_encoders,
    normalise_waveform,
    pool_audio_to_frames,
    text_features,
    vision_features,
)

from helpers import BERT_SPEC, CLIP_SPEC, VISION_CONFIG, VIT_SPEC, WAV2VEC2_SPEC

TEXTS = ["happy with au6 cheek raiser and lip corner puller", "neutral, low intensity"]


@pytest.fixture(scope="module")
def model() -> ContrastiveModel:
    torch.manual_seed(0)
    return ContrastiveModel(CLIP_SPEC, BERT_SPEC, WAV2VEC2_SPEC, embed_dim=32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(BERT_SPEC)


@pytest.fixture(scope="module")
def inputs(tokenizer) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    audio_mask = torch.ones(2, 8000, dtype=torch.long)
    audio_mask[1, 5000:] = 0
    return {
        "pixel_values": torch.randn(2, 3, 64, 64, generator=generator),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "input_values": torch.randn(2, 8000, generator=generator),
        "audio_attention_mask": audio_mask,
    }


@pytest.fixture(scope="module")
def other_state_dict() -> dict[str, torch.Tensor]:
    """Weights of a differently seeded model: exporting them proves export reads the state dict, not the model."""
    torch.manual_seed(123)
    return ContrastiveModel(CLIP_SPEC, BERT_SPEC, WAV2VEC2_SPEC, embed_dim=32).state_dict()


@pytest.fixture(scope="module")
def export_dir(model, other_state_dict, tmp_path_factory):
    return export_encoders(model, other_state_dict, tmp_path_factory.mktemp("export"))


def test_tiny_encoders_are_small(model):
    for encoder in (model.vision, model.text, model.audio):
        assert sum(p.numel() for p in encoder.parameters()) < 1_000_000
    assert model.text.config.vocab_size == len(bundled_vocab())


def test_forward_shapes_and_unit_norm(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    for key in ("image", "text", "audio"):
        assert out[key].shape == (2, 32)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        text_only = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert set(text_only) == {"text", "logit_scale_vision_text", "logit_scale_audio_text"}
    torch.testing.assert_close(text_only["text"], out["text"])


def test_logit_scale_init_and_clamp():
    torch.manual_seed(0)
    model = ContrastiveModel(CLIP_SPEC, BERT_SPEC, None, embed_dim=8, init_temperature=0.05, max_logit_scale=50)
    assert model.audio is None and not hasattr(model, "logit_scale_audio_text")
    assert model.logit_scale_vision_text.item() == pytest.approx(math.log(1 / 0.05))
    out = model(input_ids=torch.tensor([[2, 5, 3]]))
    assert out["logit_scale_vision_text"].item() == pytest.approx(20.0, rel=1e-6)
    assert "logit_scale_audio_text" not in out
    with torch.no_grad():
        model.logit_scale_vision_text.fill_(math.log(1000.0))
    clamped = model(input_ids=torch.tensor([[2, 5, 3]]))["logit_scale_vision_text"]
    assert clamped.item() == pytest.approx(50.0, rel=1e-6)
    clamped.backward()
    assert model.logit_scale_vision_text.grad.item() == 0.0


def test_export_reload_gives_identical_outputs(export_dir, other_state_dict, inputs):
    torch.manual_seed(123)
    source = ContrastiveModel(CLIP_SPEC, BERT_SPEC, WAV2VEC2_SPEC, embed_dim=32).eval()
    source.load_state_dict(other_state_dict)
    vision = CLIPVisionModel.from_pretrained(export_dir / "vision").eval()
    text = BertModel.from_pretrained(export_dir / "text", add_pooling_layer=False).eval()
    audio = Wav2Vec2Model.from_pretrained(export_dir / "audio").eval()
    with torch.no_grad():
        assert torch.equal(
            vision_features(vision, inputs["pixel_values"]), vision_features(source.vision, inputs["pixel_values"])
        )
        assert torch.equal(
            text_features(text, inputs["input_ids"], inputs["attention_mask"]),
            text_features(source.text, inputs["input_ids"], inputs["attention_mask"]),
        )
        assert torch.equal(
            audio_features(audio, inputs["input_values"], inputs["audio_attention_mask"]),
            audio_features(source.audio, inputs["input_values"], inputs["audio_attention_mask"]),
        )
    heads = load_file(str(export_dir / "projection.safetensors"))
    assert set(heads) == {
        "vision_projection.weight",
        "text_projection.weight",
        "audio_projection.weight",
        "logit_scale_vision_text",
        "logit_scale_audio_text",
    }
    for key, value in heads.items():
        assert torch.equal(value, other_state_dict[key])


def test_load_encoders_frozen_with_tokenizer_and_processing(export_dir, tokenizer, inputs):
    loaded = load_encoders(export_dir)
    assert isinstance(loaded["vision"], CLIPVisionModel) and isinstance(loaded["audio"], Wav2Vec2Model)
    for name in ("vision", "text", "audio"):
        assert not loaded[name].training
        assert not any(p.requires_grad for p in loaded[name].parameters())
    assert loaded["tokenizer"](TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert loaded["tokenizer"].decode(loaded["tokenizer"](TEXTS[0])["input_ids"], skip_special_tokens=True) == TEXTS[0]
    assert loaded["image_processing"] == image_processing(CLIP_SPEC)
    assert loaded["image_processing"]["image_size"] == 64
    preprocessor = json.loads((export_dir / "vision" / "preprocessor_config.json").read_text())
    assert preprocessor["crop_size"] == {"height": 64, "width": 64}


def test_load_encoders_rejects_bad_folders(tmp_path):
    with pytest.raises(UsageError, match="no text/config.json"):
        load_encoders(tmp_path)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(UsageError, match="not a text encoder"):
        load_encoders(tmp_path)


def test_export_rejects_partial_state_dict(model, tmp_path):
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("audio.")}
    with pytest.raises(ValueError, match="missing"):
        export_encoders(model, partial, tmp_path)


def test_text_pooling_ignores_padding(model, tokenizer):
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = text_features(model.text, ids, torch.ones_like(ids))
        with_padding = text_features(model.text, padded, mask)
    torch.testing.assert_close(with_padding, plain, atol=1e-5, rtol=1e-5)


def test_audio_pooling_ignores_padding(model):
    wave = torch.randn(1, 4000, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([wave, torch.randn(1, 2400)], dim=1)  # garbage padding: must be zeroed and masked
    mask = torch.cat([torch.ones(1, 4000), torch.zeros(1, 2400)], dim=1).bool()  # as the loader gives it
    with torch.no_grad():
        frames, frame_mask = audio_frame_features(model.audio, wave, torch.ones_like(wave, dtype=torch.long))
        padded_frames, padded_mask = audio_frame_features(model.audio, padded, mask)
        pooled = audio_features(model.audio, padded, mask)
    assert frame_mask.sum().item() == 12 == frames.shape[1]  # (4000 - 400) // 320 + 1
    assert padded_mask.shape == (1, 19) and padded_mask.sum().item() == 12 and padded_mask[0, :12].all()
    torch.testing.assert_close(padded_frames[:, :12], frames, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, frames.mean(1), atol=1e-5, rtol=1e-5)


def test_group_norm_wav2vec2_gets_zero_padding_and_no_mask():
    """Group-norm checkpoints (wav2vec2-base, -large-960h) were trained without attention masks."""
    torch.manual_seed(0)
    config = {**WAV2VEC2_SPEC["config"], "feat_extract_norm": "group", "do_stable_layer_norm": False}
    encoder = build_encoder({**WAV2VEC2_SPEC, "config": config}, "audio").eval()
    wave = torch.randn(2, 3000, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 3000, dtype=torch.long)
    mask[1, 2000:] = 0
    zero_padded = normalise_waveform(wave, mask)
    assert torch.all(zero_padded[1, 2000:] == 0)
    assert zero_padded[1, :2000].mean().abs() < 1e-5 and (zero_padded[1, :2000].std() - 1).abs() < 1e-3
    with torch.no_grad():
        frames, frame_mask = audio_frame_features(encoder, wave, mask)
        expected = encoder(zero_padded).last_hidden_state
    assert torch.equal(frames, expected)
    assert frame_mask.sum(1).tolist() == [9, 6]


def test_pool_audio_to_frames_hand_case():
    feats = torch.arange(25, dtype=torch.float32)[:, None].repeat(1, 2)  # frame f has value f, starts at f * 20 ms
    mask = torch.ones(25, dtype=torch.bool)
    mask[22:] = False
    pooled = pool_audio_to_frames(feats, mask, num_video_frames=4)
    # windows of 200 ms: frames 0-9, 10-19, 20-21 (22-24 invalid), none -> nearest valid frame to 0.7 s is 21
    expected = torch.tensor([4.5, 14.5, 20.5, 21.0])[:, None].repeat(1, 2)
    torch.testing.assert_close(pooled, expected)
    # audio longer than the video: the rest is dropped
    torch.testing.assert_close(pool_audio_to_frames(feats, mask, num_video_frames=1), torch.full((1, 2), 4.5))
    # a video window before the first valid frame takes the nearest one
    late = torch.zeros(25, dtype=torch.bool)
    late[12:15] = True
    torch.testing.assert_close(pool_audio_to_frames(feats, late, 2, video_fps=5.0)[:, 0], torch.tensor([12.0, 13.0]))
    # no valid audio at all -> zeros
    assert torch.equal(pool_audio_to_frames(feats, torch.zeros(25, dtype=torch.bool), 3), torch.zeros(3, 2))


def test_vit_arch_works_and_round_trips(tmp_path, inputs):
    torch.manual_seed(0)
    model = ContrastiveModel(VIT_SPEC, BERT_SPEC, None, embed_dim=16).eval()
    assert isinstance(model.vision, ViTModel) and model.vision.pooler is None
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"])
        cls = model.vision(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]
    assert out["image"].shape == (2, 16)
    torch.testing.assert_close(out["image"], torch.nn.functional.normalize(model.vision_projection(cls), dim=-1))
    export_encoders(model, model.state_dict(), tmp_path)
    assert not (tmp_path / "audio").exists()
    loaded = load_encoders(tmp_path)
    assert isinstance(loaded["vision"], ViTModel) and loaded["audio"] is None
    with torch.no_grad():
        assert torch.equal(
            vision_features(loaded["vision"], inputs["pixel_values"]),
            vision_features(model.vision, inputs["pixel_values"]),
        )
    assert (
        json.loads((tmp_path / "vision" / "preprocessor_config.json").read_text())["image_processor_type"]
        == "ViTImageProcessor"
    )


def test_pretrained_vision_from_local_full_clip_folder(tmp_path):
    """openai/clip-vit-* folders hold a whole CLIPModel; the vision tower and its processor config load from it."""
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=VISION_CONFIG,
            text_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "vocab_size": 100,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
        )
    )
    clip.save_pretrained(tmp_path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    spec = {"arch": "clip", "pretrained": str(tmp_path), "config": None}
    vision = build_encoder(spec, "vision")
    expected = clip.vision_model.state_dict()
    assert vision.state_dict().keys() == expected.keys()
    for key, value in vision.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert image_processing(spec) == {"image_size": 64, "image_mean": mean, "image_std": std}


def test_bad_specs_are_rejected(tmp_path):
    with pytest.raises(UsageError, match="needs 'pretrained'"):
        build_encoder({"arch": "clip", "pretrained": None, "config": None}, "vision")
    with pytest.raises(UsageError, match="arch must be one of"):
        build_encoder({"arch": "bert", "pretrained": None, "config": {}}, "vision")
    with pytest.raises(UsageError, match="unknown keys"):
        build_encoder({**BERT_SPEC, "extra": 1}, "text")
    with pytest.raises(UsageError, match="vocab_size 10 is smaller"):
        build_encoder({**BERT_SPEC, "config": {**BERT_SPEC["config"], "vocab_size": 10}}, "text")
    with pytest.raises(UsageError, match="cannot load pretrained"):
        build_encoder({"arch": "bert", "pretrained": str(tmp_path / "absent"), "config": None}, "text")
    with pytest.raises(UsageError, match="needs a vision or an audio encoder"):
        ContrastiveModel(None, BERT_SPEC, None, embed_dim=8)


def test_config_next_to_pretrained_overrides_fields(tmp_path):
    build_encoder(BERT_SPEC, "text").save_pretrained(tmp_path / "bert")
    encoder = build_encoder(
        {
            "arch": "bert",
            "pretrained": str(tmp_path / "bert"),
            "config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.25},
        },
        "text",
    )
    assert encoder.config.hidden_dropout_prob == 0.0 and encoder.config.attention_probs_dropout_prob == 0.25
    assert encoder.config.hidden_size == BERT_SPEC["config"]["hidden_size"]
