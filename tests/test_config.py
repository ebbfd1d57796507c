import pytest
import yaml

from emi.cli import main
from emi.config import (
    SHIPPED_CONFIGS,
    Stage1Config,
    Stage2Config,
    TrainSection,
    build_config,
    config_kind,
    load_config,
    resolve_config_path,
    save_config,
    shipped_config_names,
)
from emi.errors import UsageError
from emi.models.options import check_model_options


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
    with pytest.raises(UsageError, match="model.fusion is 'sum'"):  # the models' own names: they check them
        check_model_options(load_config(Stage2Config, None, ["model.fusion=sum"]))


def test_stage1_pairs_need_their_encoders(tmp_path):
    path = write(tmp_path, "model:\n  pairs: [audio_text]\n  text: {arch: bert, pretrained: bert-base-uncased}\n")
    with pytest.raises(UsageError, match="model.audio is not set"):
        check_model_options(load_config(Stage1Config, path))
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


def test_a_config_is_found_by_path_or_by_its_shipped_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = load_config(Stage1Config, "stage1/tiny.yaml")
    assert shipped.run.name == "stage1-tiny" and shipped.model.vision.arch == "clip"
    (tmp_path / "stage1").mkdir()  # a file of the user's with the same name comes first
    (tmp_path / "stage1" / "tiny.yaml").write_text(
        (SHIPPED_CONFIGS / "stage1/tiny.yaml").read_text().replace("name: stage1-tiny", "name: mine")
    )
    assert load_config(Stage1Config, "stage1/tiny.yaml").run.name == "mine"
    with pytest.raises(UsageError) as err:
        load_config(Stage1Config, "stage1/huge.yaml")
    assert (
        f"config file not found: stage1/huge.yaml (looked for stage1/huge.yaml, {SHIPPED_CONFIGS}/stage1/huge.yaml)"
        in str(err.value)
        and "emi config list" in str(err.value)
    )
    assert resolve_config_path("tiny.yaml", beside=SHIPPED_CONFIGS / "stage2") == SHIPPED_CONFIGS / "stage2/tiny.yaml"
    assert {
        "stage1/tiny.yaml",
        "stage2/vitl.yaml",
        "sweeps/ablation.yaml",
        "deepspeed/zero2.json",
        "accelerate/cpu.yaml",
    } <= set(shipped_config_names())


def test_an_override_in_the_wrong_section_goes_to_the_one_section_with_that_key(capsys):
    config = load_config(Stage1Config, "stage1/tiny.yaml", ["train.lr=0.1", "epochs=2"])
    assert config.optim.lr == 0.1 and config.train.epochs == 2
    assert capsys.readouterr().err.splitlines() == [
        "emi: train.lr is not a key of the config; set as optim.lr",
        "emi: epochs is not a key of the config; set as train.epochs",
    ]


def test_a_key_in_the_wrong_section_of_a_file_is_pointed_to_its_section(tmp_path):
    with pytest.raises(UsageError, match=r"unknown key 'train.lr' in train; .*; did you mean optim.lr\?"):
        load_config(Stage1Config, write(tmp_path, "train: {lr: 0.1}\n"))
    with pytest.raises(UsageError, match=r"did you mean model.vision.arch or model.text.arch or model.audio.arch\?"):
        load_config(Stage1Config, None, ["model.arch=clip"])


def test_the_kind_of_a_config_comes_from_its_folder_or_its_sections(tmp_path):
    assert [
        config_kind(SHIPPED_CONFIGS / name) for name in ("stage1/vitl.yaml", "stage2/tiny.yaml", "sweeps/kfold.yaml")
    ] == ["stage1", "stage2", "sweep"]
    for text, kind in (
        ("model: {pairs: [vision_text]}\n", "stage1"),
        ("loss: {pearson: 1}\n", "stage2"),
        ("base: stage2/tiny.yaml\n", "sweep"),
    ):
        assert config_kind(write(tmp_path, text)) == kind
    with pytest.raises(UsageError, match="cannot tell which kind of config it is; say it with --kind"):
        config_kind(write(tmp_path, "train: {epochs: 3}\n"))


def test_emi_config_show_prints_the_resolved_config_and_list_the_shipped_ones(capsys):
    assert main(["config", "show", "stage2/tiny.yaml", "optim.lr=0.5", "train.epochs=2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# stage2 config {SHIPPED_CONFIGS / 'stage2/tiny.yaml'} with optim.lr=0.5")
    resolved = yaml.safe_load(printed)
    assert load_config(Stage2Config, "stage2/tiny.yaml", ["optim.lr=0.5", "train.epochs=2"]) == build_config(
        Stage2Config, resolved, "printed"
    )
    assert resolved["train"]["eval_every"] == TrainSection().eval_every  # a default the file does not set
    assert main(["config", "show", "sweeps/ablation.yaml", "top_k=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["top_k"] == 5
    assert main(["config", "show", "stage1/tiny.yaml", "train.lr=0.1"]) == 0
    shown = capsys.readouterr()
    assert yaml.safe_load(shown.out)["optim"]["lr"] == 0.1 and "set as optim.lr" in shown.err
    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "stage1/tiny.yaml" in listed and "sweeps/kfold.yaml" in listed
