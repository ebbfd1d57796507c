"""arch: auto encoders: tiny random-config models of two or three transformers families per modality, saved as
pretrained folders with their processors and tokenizers, built, pooled, exported, reloaded, trained and extracted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    BertTokenizerFast,
    Dinov2Config,
    Dinov2Model,
    DistilBertConfig,
    DistilBertModel,
    HubertConfig,
    HubertModel,
    RobertaConfig,
    RobertaModel,
    SiglipConfig,
    SiglipModel,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from emi.engine.prepare import enable_activation_checkpointing
from emi.errors import UsageError
from emi.models.encoders import (
    ContrastiveModel,
    audio_extractor,
    audio_features,
    audio_frame_features,
    build_encoder,
    build_tokenizer,
    bundled_vocab,
    export_encoders,
    image_processing,
    load_encoders,
    log_mel,
    masked_mean,
    text_features,
    vision_features,
)

from helpers import EMI, GRID, REPO, cpu_env

LAYERS = {"num_hidden_layers": 2, "num_attention_heads": 2}
VISION = {**LAYERS, "hidden_size": 32, "patch_size": 8}
CONV_AUDIO = {
    **LAYERS,
    "hidden_size": 32,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "mask_time_prob": 0.0,
    "layerdrop": 0.0,
}
VOCAB = len(bundled_vocab())
ELECTRA_SPEC = {
    "arch": "auto",
    "pretrained": None,
    "config": {
        "model_type": "electra",
        **LAYERS,
        "hidden_size": 32,
        "embedding_size": 16,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}
TEXTS = ["happy with au6 cheek raiser and lip corner puller", "neutral, low intensity"]


def save_processor(folder: Path, processor: dict) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


def save_tokenizer(folder: Path) -> None:
    BertTokenizerFast(vocab=bundled_vocab(), model_max_length=60).save_pretrained(folder)


def make_families(root: Path) -> dict[str, tuple[str, dict]]:
    """family -> (modality, encoder spec) of tiny pretrained folders under `root` (and ELECTRA from a config)."""
    torch.manual_seed(0)
    folders = {}

    def folder(name: str, model) -> Path:
        folders[name] = root / name
        model.save_pretrained(folders[name])
        return folders[name]

    # DINOv2 checkpoints say a larger image_size in the config (position embeddings) than the processor's crop
    save_processor(
        folder("dinov2", Dinov2Model(Dinov2Config(**VISION, image_size=64, mlp_ratio=2))),
        {
            "image_processor_type": "BitImageProcessor",
            "do_center_crop": True,
            "crop_size": {"height": 32, "width": 32},
            "size": {"shortest_edge": 36},
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
    )
    # a whole SigLIP (both towers), as google/siglip-* folders hold it: the vision tower is taken
    siglip = SiglipModel(
        SiglipConfig(
            vision_config={**VISION, "image_size": 32, "intermediate_size": 64},
            text_config={**LAYERS, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 100},
        )
    )
    save_processor(
        folder("siglip", siglip),
        {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": 32, "width": 32},
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        },
    )
    hubert = folder("hubert", HubertModel(HubertConfig(**CONV_AUDIO)))
    Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True).save_pretrained(hubert)
    folder("wavlm", WavLMModel(WavLMConfig(**CONV_AUDIO, num_buckets=16, max_bucket_distance=32)))
    whisper = WhisperForConditionalGeneration(
        WhisperConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=100,
            max_target_positions=16,
            vocab_size=100,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    )
    WhisperFeatureExtractor(feature_size=16).save_pretrained(folder("whisper", whisper))  # 100 frames: 2 s
    save_tokenizer(
        folder(
            "roberta",
            RobertaModel(
                RobertaConfig(
                    **LAYERS,
                    hidden_size=32,
                    intermediate_size=64,
                    vocab_size=VOCAB,
                    pad_token_id=0,
                    max_position_embeddings=64,
                )
            ),
        )
    )
    save_tokenizer(
        folder(
            "distilbert",
            DistilBertModel(
                DistilBertConfig(
                    n_layers=2,
                    n_heads=2,
                    dim=48,
                    hidden_dim=64,
                    vocab_size=VOCAB,
                    pad_token_id=0,
                    max_position_embeddings=64,
                )
            ),
        )
    )
    modality = {
        "dinov2": "vision",
        "siglip": "vision",
        "hubert": "audio",
        "wavlm": "audio",
        "whisper": "audio",
        "roberta": "text",
        "distilbert": "text",
    }
    families = {
        name: (modality[name], {"arch": "auto", "pretrained": str(path), "config": None})
        for name, path in folders.items()
    }
    return {**families, "electra": ("text", ELECTRA_SPEC)}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    return make_families(tmp_path_factory.mktemp("families"))


def spec_of(families, name: str) -> dict:
    return families[name][1]


CLASSES = {
    "dinov2": "Dinov2Model",
    "siglip": "SiglipVisionModel",
    "hubert": "HubertModel",
    "wavlm": "WavLMModel",
    "whisper": "WhisperEncoder",
    "roberta": "RobertaModel",
    "distilbert": "DistilBertModel",
    "electra": "ElectraModel",
}
WIDTHS = {"distilbert": 48}


def waveforms(samples: int = 12000, valid: int = 7000) -> tuple[torch.Tensor, torch.Tensor]:
    wave = torch.randn(2, samples, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, samples, dtype=torch.long)
    mask[1, valid:] = 0
    return wave, mask


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_each_family_builds_its_model_with_the_pooling_of_its_kind(families, family):
    modality, spec = families[family]
    torch.manual_seed(0)
    encoder = build_encoder(spec, modality).eval()
    assert type(encoder).__name__ == CLASSES[family]
    # no parameter the features never use is trained (DDP and ZeRO want a gradient for each): DINOv2's mask
    # token (masked-image pretraining) is frozen, unused poolers are not built
    frozen = [name for name, parameter in encoder.named_parameters() if not parameter.requires_grad]
    assert frozen == {"dinov2": ["embeddings.mask_token"]}.get(family, [])
    assert getattr(encoder, "pooler", None) is None
    width = WIDTHS.get(family, 32)
    assert encoder.config.hidden_size == width
    with torch.no_grad():
        if modality == "vision":
            pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            pooled, outputs = vision_features(encoder, pixels), encoder(pixel_values=pixels)
            # DINOv2: the normed CLS token; SigLIP: its attention-pooling head, which no token equals
            expected = outputs.pooler_output if family == "siglip" else outputs.last_hidden_state[:, 0]
            assert family != "siglip" or not torch.allclose(pooled, outputs.last_hidden_state[:, 0])
        elif modality == "text":
            tokens = build_tokenizer(spec)(TEXTS, padding=True, return_tensors="pt")
            pooled = text_features(encoder, tokens["input_ids"], tokens["attention_mask"])
            states = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
            length = int(tokens["attention_mask"][1].sum())
            expected = torch.stack([states[0].mean(0), states[1, :length].mean(0)])
        else:
            wave, mask = waveforms()
            pooled = audio_features(encoder, wave, mask, audio_extractor(spec))
            frames, frame_mask = audio_frame_features(encoder, wave, mask, audio_extractor(spec))
            expected = masked_mean(frames, frame_mask)
            # 20 ms frames; a frame is valid when its receptive field (Whisper: its 320 samples) is
            valid = [7000 // 320, (7000 - 400) // 320 + 1][family != "whisper"]
            assert frame_mask[1].sum().item() == valid and frame_mask[1, :valid].all()
    assert pooled.shape == (2, width)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)


def test_preprocessing_comes_from_the_processor_and_feature_extractor(families):
    # the processor's crop (32), not the config's image_size (64)
    assert image_processing(spec_of(families, "dinov2")) == {
        "image_size": 32,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    assert image_processing(spec_of(families, "siglip"))["image_mean"] == [0.5] * 3
    hubert, whisper = audio_extractor(spec_of(families, "hubert")), audio_extractor(spec_of(families, "whisper"))
    assert isinstance(whisper, WhisperFeatureExtractor) and whisper.feature_size == 16
    assert (hubert.sampling_rate, hubert.do_normalize) == (16000, False)
    assert audio_extractor(spec_of(families, "wavlm")).do_normalize  # no extractor saved: Wav2Vec2's default
    torch.manual_seed(0)
    encoder = build_encoder(spec_of(families, "hubert"), "audio").eval()
    wave, mask = waveforms()
    with torch.no_grad():  # not normalised (do_normalize false): the raw waveform, padding zeroed
        frames, _ = audio_frame_features(encoder, wave, mask, hubert)
        expected = encoder(wave * mask, attention_mask=mask).last_hidden_state
    assert torch.equal(frames, expected)
    # Whisper's log-mel spectrogram as its feature extractor computes it
    one = wave[0, :8000]
    reference = whisper(
        one.numpy(), sampling_rate=16000, return_tensors="np", padding="max_length", max_length=8000
    ).input_features
    np.testing.assert_allclose(log_mel(one[None], whisper).numpy(), reference, atol=1e-5)


@pytest.mark.parametrize("family", ["hubert", "wavlm", "whisper", "roberta", "distilbert", "electra"])
def test_padding_does_not_change_the_embedding(families, family):
    modality, spec = families[family]
    torch.manual_seed(0)
    encoder = build_encoder(spec, modality).eval()
    with torch.no_grad():
        if modality == "text":
            ids = build_tokenizer(spec)(TEXTS[0], return_tensors="pt")["input_ids"]
            padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
            mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 9, dtype=torch.long)], dim=1)
            plain, with_padding = (
                text_features(encoder, ids, torch.ones_like(ids)),
                text_features(encoder, padded, mask),
            )
        else:
            extractor = audio_extractor(spec)
            wave = torch.randn(1, 6000, generator=torch.Generator().manual_seed(2))
            padded = torch.cat([wave, torch.randn(1, 3000)], dim=1)  # garbage padding: zeroed and masked
            mask = torch.cat([torch.ones(1, 6000), torch.zeros(1, 3000)], dim=1).bool()
            plain = audio_features(encoder, wave, torch.ones_like(wave, dtype=torch.long), extractor)
            with_padding = audio_features(encoder, padded, mask, extractor)
    torch.testing.assert_close(with_padding, plain, atol=1e-5, rtol=1e-5)


COMBINATIONS = [("dinov2", "roberta", "hubert"), ("siglip", "distilbert", "wavlm"), ("siglip", "electra", "whisper")]


@pytest.mark.parametrize("combination", COMBINATIONS, ids="-".join)
def test_export_records_auto_and_reloads_with_identical_outputs(families, combination, tmp_path):
    vision, text, audio = (spec_of(families, name) for name in combination)
    torch.manual_seed(0)
    model = ContrastiveModel(vision, text, audio, embed_dim=16).eval()
    export_encoders(model, model.state_dict(), tmp_path)
    assert json.loads((tmp_path / "archs.json").read_text()) == {"vision": "auto", "text": "auto", "audio": "auto"}
    loaded = load_encoders(tmp_path)
    # plain transformers reads the folders too (Whisper's is its encoder alone)
    plain = {
        "vision": AutoModel.from_pretrained(tmp_path / "vision").eval(),
        "text": AutoModel.from_pretrained(tmp_path / "text").eval(),
        "audio": (WhisperEncoder if combination[2] == "whisper" else AutoModel)
        .from_pretrained(tmp_path / "audio")
        .eval(),
    }
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = build_tokenizer(text)(TEXTS, padding=True, return_tensors="pt")
    assert loaded["tokenizer"](TEXTS)["input_ids"] == build_tokenizer(text)(TEXTS)["input_ids"]
    wave, mask = waveforms()
    extractor = loaded["audio_extractor"]
    assert type(extractor) is type(model.audio_extractor)
    assert extractor.to_dict() == model.audio_extractor.to_dict()
    assert loaded["image_processing"] == image_processing(vision)
    # A reloaded model may run another attention kernel than the one built in memory (SigLIP's pooling head
    # took another path on some runs): the same weights, rounded otherwise in the last bits.
    same = {"rtol": 1e-5, "atol": 1e-6}
    with torch.no_grad():
        for name, encoder in (("loaded", loaded), ("from_pretrained", plain)):
            assert type(encoder["audio"]) is type(model.audio), name
            torch.testing.assert_close(
                vision_features(encoder["vision"], pixels), vision_features(model.vision, pixels), **same
            )
            torch.testing.assert_close(
                text_features(encoder["text"], tokens["input_ids"], tokens["attention_mask"]),
                text_features(model.text, tokens["input_ids"], tokens["attention_mask"]),
                **same,
            )
            torch.testing.assert_close(
                audio_features(encoder["audio"], wave, mask, extractor),
                audio_features(model.audio, wave, mask, model.audio_extractor),
                **same,
            )
    heads = load_file(str(tmp_path / "projection.safetensors"))
    assert heads["text_projection.weight"].shape == (16, WIDTHS.get(combination[1], 32))


def test_activation_checkpointing_gives_the_same_gradients(families):
    specs = [spec_of(families, name) for name in ("dinov2", "roberta", "whisper")]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = build_tokenizer(specs[1])(TEXTS, padding=True, return_tensors="pt")
    wave, mask = waveforms(samples=16000)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = ContrastiveModel(*specs, embed_dim=16).train()
        if checkpointed:
            assert enable_activation_checkpointing(model) == ["text", "vision", "audio"]
        torch.manual_seed(1)  # the same dropout masks
        out = model(
            pixel_values=pixels,
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            input_values=wave,
            audio_attention_mask=mask,
        )
        (out["image"] @ out["text"].T + out["audio"] @ out["text"].T).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("audio.layers.") for n in grads[0]) and any(n.startswith("vision.") for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_of_another_modality_is_refused(families, tmp_path):
    with pytest.raises(
        UsageError,
        match=r"roberta: RobertaModel \(model_type 'roberta'\) is a model of text "
        r"\(it takes input_ids\), not of vision: it cannot be the vision encoder",
    ):
        build_encoder(spec_of(families, "roberta"), "vision")
    with pytest.raises(
        UsageError,
        match=r"dinov2: Dinov2Model .* is a model of vision \(it takes pixel_values\), "
        r"not of audio",
    ):
        build_encoder(spec_of(families, "dinov2"), "audio")
    with pytest.raises(UsageError, match=r"WhisperModel .* is a model of audio .* not of text"):
        build_encoder(spec_of(families, "whisper"), "text")
    with pytest.raises(UsageError, match="needs its model_type"):
        build_encoder({"arch": "auto", "config": {"hidden_size": 32}}, "vision")
    with pytest.raises(UsageError, match="cannot load pretrained"):
        build_encoder({"arch": "auto", "pretrained": str(tmp_path / "absent")}, "text")
    # every slot checks its modality first, before reading a tokenizer, image processing or feature extractor
    for slot, family, kind in (
        ("audio", "dinov2", "vision"),
        ("text", "hubert", "audio"),
        ("vision", "whisper", "audio"),
    ):
        specs = {
            "vision": None,
            "text": spec_of(families, "roberta"),
            "audio": spec_of(families, "hubert"),
            slot: spec_of(families, family),
        }
        with pytest.raises(
            UsageError,
            match=rf"{family}: \w+ \(model_type .*\) is a model of {kind} .* not of "
            rf"{slot}: it cannot be the {slot} encoder",
        ):
            ContrastiveModel(specs["vision"], specs["text"], specs["audio"], embed_dim=8)
    # an export whose audio folder holds a text model is refused by name
    torch.manual_seed(0)
    model = ContrastiveModel(None, spec_of(families, "roberta"), spec_of(families, "hubert"), embed_dim=8)
    export_encoders(model, model.state_dict(), tmp_path / "export")
    (tmp_path / "export" / "audio" / "config.json").write_text(
        (tmp_path / "export" / "text" / "config.json").read_text()
    )
    with pytest.raises(UsageError, match=r"audio.*RobertaModel .* is a model of text .* not of audio"):
        load_encoders(tmp_path / "export")


def test_stage1_with_auto_encoders_then_features_and_predict(families, synthetic_shards, tmp_path):
    """Two Stage I steps (one process) with DINOv2, RoBERTa and Whisper's encoder; the export's features of the
    val clips; a fusion checkpoint on those encoders predicts a real clip."""
    from emi import EMI_EMOTIONS
    from emi.formats.fusion import EncodersRecord, FusionRecord, FusionSpec
    from emi.formats.manifest import Preprocessing, read_manifest
    from emi.io import folder_records
    from emi.models.fusion import FusionModel
    from emi.models.fusion_checkpoint import save_fusion
    from emi.serve.features import extract_features
    from emi.serve.predict import predict

    config = yaml.safe_load((REPO / "configs/stage1/tiny.yaml").read_text())
    config["model"].update(
        vision=spec_of(families, "dinov2"),
        text=spec_of(families, "roberta"),
        audio=spec_of(families, "whisper"),
        embed_dim=16,
    )
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        str(REPO / "train/stage1.py"),
        "--config",
        str(tmp_path / "auto.yaml"),
        f"data.train={synthetic_shards['train']}",
        f"data.val={synthetic_shards['val']}",
        f"run.output_dir={tmp_path}",
        "run.name=auto",
        "data.batch_size=8",
        "train.strategy=ddp",
        "train.max_steps=2",
        "train.epochs=1",
        "train.log_every=1",
        "data.num_workers=0",
    ]
    result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "done: 2 steps" in (tmp_path / "auto" / "log.txt").read_text()
    export = tmp_path / "auto" / "export"
    assert json.loads((export / "archs.json").read_text()) == {"vision": "auto", "text": "auto", "audio": "auto"}

    extract_features(export, str(synthetic_shards["val"]), tmp_path / "features", batch_size=4, num_workers=0)
    manifest = read_manifest(tmp_path / "features")
    assert manifest.dims == {"vision": 32, "audio": 32, "text": 32} and manifest.num_samples == 16

    torch.manual_seed(0)
    fusion = {
        "vision_dim": 32,
        "audio_dim": 32,
        "text_dim": 32,
        "d_model": 16,
        "num_segments": 4,
        "tcn_layers": 1,
        "lstm_hidden": 8,
        "transformer_layers": 1,
        "transformer_heads": 2,
        "dropout": 0.0,
        "num_outputs": len(EMI_EMOTIONS),
    }
    record = FusionRecord(
        spec=FusionSpec.from_dict(fusion, "test"),
        labels=list(EMI_EMOTIONS),
        encoders=EncodersRecord(str(export), folder_records(export)),
        preprocessing=Preprocessing(frame_size=64),
        num_frames=8,
    )
    save_fusion(tmp_path / "best", FusionModel(record.spec).state_dict(), record, export)
    (result,) = predict(tmp_path / "best", [str(sorted(GRID.glob("*.mpg"))[0])], batch_size=1)
    assert set(result["intensities"]) == set(EMI_EMOTIONS), result
    assert all(math.isfinite(value) for value in result["intensities"].values())


def test_shipped_auto_config_builds_with_local_folders_in_place_of_its_names(families):
    from emi.config import Stage1Config, load_config
    from emi.stages.stage1 import audio_spec, build_model, train_flops_per_sample

    folders = {
        name: spec_of(families, family)["pretrained"]
        for name, family in (("vision", "dinov2"), ("text", "roberta"), ("audio", "wavlm"))
    }
    config = load_config(
        Stage1Config,
        REPO / "configs/stage1/auto.yaml",
        [f"model.{name}.pretrained={folder}" for name, folder in folders.items()],
    )
    assert {name: getattr(config.model, name).arch for name in folders} == dict.fromkeys(folders, "auto")
    torch.manual_seed(0)
    model = build_model(config)
    assert [type(getattr(model, name)).__name__ for name in folders] == ["Dinov2Model", "RobertaModel", "WavLMModel"]
    assert model.audio.config.mask_time_prob == 0.0  # the config's overrides
    assert audio_spec(model, config, train=False).window == 6 * 16000
    assert train_flops_per_sample(model, config) is None  # emi.models.flops counts the built-in archs only


def test_stage1_refuses_an_audio_window_longer_than_whispers(families):
    from emi.config import Stage1Config, load_config
    from emi.stages.stage1 import audio_spec, build_model

    config = load_config(
        Stage1Config,
        REPO / "configs/stage1/tiny.yaml",
        [f"model.audio={json.dumps(spec_of(families, 'whisper'))}", "data.audio_seconds=2.5"],
    )
    torch.manual_seed(0)
    model = build_model(config)
    with pytest.raises(
        UsageError,
        match=r"data.audio_seconds=2.5: the audio encoder \(WhisperEncoder\) hears "
        r"windows of at most 2 s",
    ):
        audio_spec(model, config, train=True)


def test_the_command_line_refuses_a_vision_folder_in_the_audio_slot(families, tmp_path):
    dinov2 = spec_of(families, "dinov2")["pretrained"]
    result = subprocess.run(
        [
            *EMI,
            "train",
            "stage1",
            "--config",
            "stage1/tiny.yaml",
            f"model.audio={{arch: auto, pretrained: {dinov2}}}",
            f"run.output_dir={tmp_path}",
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: {dinov2}: Dinov2Model (model_type 'dinov2') is a model of vision (it takes pixel_values), not "
        "of audio: it cannot be the audio encoder"
    ) in result.stderr
