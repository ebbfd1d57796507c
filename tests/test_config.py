import pytest

from emi.config import Stage1Config, Stage2Config, load_config, save_config
from emi.errors import UsageError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "run: {name: a}\ntrain: {epochs: 3, strategy: zero2}\noptim: {lr: 1e-4}\n")
    config = load_config(Stage2Config, path, ["train.epochs=5", "data.batch_size=8", "model.modalities=[audio]"])
    assert config.run.name == "a"
    assert config.train.epochs == 5 and config.train.strategy == "zero2"
    assert config.optim.lr == pytest.approx(1e-4) and isinstance(config.optim.lr, float)
    assert config.data.batch_size == 8
    assert config.model.modalities == ["audio"]


def test_unknown_key_names_file_key_and_alternatives(tmp_path):
    path = write(tmp_path, "train: {epochz: 3}\n")
    with pytest.raises(UsageError) as err:
        load_config(Stage2Config, path)
    message = str(err.value)
    assert str(path) in message and "'train.epochz'" in message and "epochs" in message


def test_unknown_override_and_bad_type_and_choice(tmp_path):
    with pytest.raises(UsageError, match="unknown key 'optim.lrr'"):
        load_config(Stage2Config, None, ["optim.lrr=1"])
    with pytest.raises(UsageError, match="train.epochs must be int"):
        load_config(Stage2Config, None, ["train.epochs=many"])
    with pytest.raises(UsageError, match="train.strategy is 'zero4'"):
        load_config(Stage2Config, None, ["train.strategy=zero4"])
    with pytest.raises(UsageError, match="must look like section.key=value"):
        load_config(Stage2Config, None, ["train.epochs"])


def test_stage2_loss_weights_and_fusion_choices(tmp_path):
    config = load_config(Stage2Config, write(tmp_path, "loss: {pearson: 1}\nmodel: {fusion: xattn}\n"))
    assert (config.loss.mse, config.loss.pearson, config.loss.ccc) == (1.0, 1.0, 0.0)  # mse keeps its default
    assert config.model.fusion == "xattn"
    with pytest.raises(UsageError, match="loss weights must be >= 0 and one of them > 0"):
        load_config(Stage2Config, None, ["loss.mse=0"])
    with pytest.raises(UsageError, match="loss weights must be >= 0"):
        load_config(Stage2Config, None, ["loss.ccc=-1"])
    with pytest.raises(UsageError, match="loss weights must be >= 0 and one of them > 0"):
        load_config(Stage2Config, None, ["loss.mse=0", "loss.unimodal=1"])  # a term of the fused prediction
    with pytest.raises(UsageError, match="loss.unimodal must be >= 0"):
        load_config(Stage2Config, None, ["loss.unimodal=-0.5"])
    with pytest.raises(UsageError, match="unknown key 'loss.huber'"):
        load_config(Stage2Config, None, ["loss.huber=1"])
    with pytest.raises(UsageError, match="model.fusion is 'sum'"):
        load_config(Stage2Config, None, ["model.fusion=sum"])


def test_stage1_pairs_need_their_encoders(tmp_path):
    path = write(tmp_path, "model:\n  pairs: [audio_text]\n  text: {arch: bert, pretrained: bert-base-uncased}\n")
    with pytest.raises(UsageError, match="model.audio is not set"):
        load_config(Stage1Config, path)
    config = load_config(Stage1Config, path, ["model.audio={arch: wav2vec2, pretrained: x}"])
    assert config.model.audio.arch == "wav2vec2" and config.model.vision is None


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(Stage2Config, None, ["train.epochs=7", "model.fusion=mean"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(Stage2Config, tmp_path / "saved.yaml") == config


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(Stage2Config, tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(Stage2Config, write(tmp_path, "train: [unclosed\n"))
