"""Run configs: YAML files validated against dataclass schemas, plus dotted overrides from the command line.

A config file is data: every key must exist in the schema below, or loading fails with a message that names the
file, the key and the keys that are allowed there. Overrides use the same dotted paths as the YAML nesting:

    emi train stage1 --config configs/stage1/tiny.yaml train.epochs=3 data.batch_size=8 model.pairs=[vision_text]

Values are parsed as YAML (numbers, booleans, lists, null). The resolved config is saved with every run.

A config is named by its path, or by its name among the shipped configs (emi/configs, `emi config list`):
`--config stage1/tiny.yaml` works from any folder once emi is installed. `emi config show NAME [key=value ...]`
prints the resolved config with every default filled in.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from emi import configs as shipped_configs
from emi.errors import UsageError

T = TypeVar("T")
SHIPPED_CONFIGS = Path(shipped_configs.__file__).parent
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


# ---------------------------------------------------------------------------------------------------------------
# Sections shared by both stages
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunSection:
    name: str = "emi"
    output_dir: str = "runs"  # the run lives in <output_dir>/<name>/
    seed: int = 0
    publish_to: str | None = None  # also copy each export (export/, best/) to <publish_to>/<export>/: a URL or folder


@dataclass
class DataSection:
    """What both stages read their data with; each stage's own keys are in Stage1Data and Stage2Data."""

    train: str = ""  # shard spec: folder with manifest.json, brace pattern, pipe: URL, or a '::' list
    val: str | None = None
    manifest: str | None = None  # explicit manifest for pipe: shards (or shards with none beside them)
    batch_size: int = 32  # per rank, per micro step
    num_workers: int = 2
    pin_memory: bool | None = None  # page-locked batches for asynchronous host-to-GPU copies (null: on CUDA)
    prefetch_factor: int = 2  # batches each worker keeps ready
    persistent_workers: bool = True  # keep the workers (and their open state) from one epoch to the next
    shuffle_buffer: int = 256
    resampled: bool = False  # draw shards with replacement (very large or uneven shard sets)


@dataclass
class SourceSection:
    """One data set of a Stage I mix (data.sources)."""

    shards: str = ""  # shard spec, as data.train
    weight: float = 1.0  # its share of every epoch, relative to the other sources' weights
    name: str = ""  # in the per-source counts (default: the last part of its shard spec)
    prompts: list[str] | None = None  # prompt families (expression, au, va, emi); null: all its samples carry


@dataclass
class Stage1Data(DataSection):
    augment: bool = True  # training augmentation (crops, flips, audio gain/noise); never in eval
    audio_seconds: float = 4.0  # waveform window length
    max_text_len: int = 64
    sources: list[SourceSection] | None = None  # a weighted mix of data sets, in place of data.train
    epoch_samples: int = 0  # samples per epoch; 0: all the sources (or data.train) hold together


def source_names(sources: list[SourceSection]) -> list[str]:
    """Each source's name: its own, or the last part of its shard spec."""
    return [
        source.name or source.shards.rstrip("/").rsplit("/", 1)[-1] or f"source{i}" for i, source in enumerate(sources)
    ]


@dataclass
class Stage2Data(DataSection):
    num_frames: int = 16  # frames per clip (uniform sampling or padding); 0: all, padded to the batch's longest
    folds: int = 0  # K >= 2: K-fold over train + val (emi.data.folds); 0: train and val as given
    fold: int = 0  # with folds: this run validates on fold i (0 <= i < K) and trains on the others


@dataclass
class OptimSection:
    lr: float = 1e-5  # SGDR eta_max
    min_lr: float = 1e-7  # SGDR eta_min
    restart_epochs: float = 10.0  # SGDR cycle length T_i, in epochs; stepped per iteration
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6


@dataclass
class TrainSection:
    epochs: int = 50
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    strategy: str = "ddp"  # ddp | zero2 | zero3
    deepspeed_config: str | None = None  # default: configs/deepspeed/<strategy>.json
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | no
    grad_accum: int = 1
    clip_grad: float = 1.0
    log_every: int = 10  # steps between console lines / TensorBoard scalars
    checkpoint_every: int = 500  # steps between resumable checkpoints (also saved at each epoch end)
    keep_last: int = 3  # resumable checkpoints kept
    eval_every: int = 1  # epochs between evaluations
    resume: str = "none"  # none | latest (if any) | path to a checkpoint folder
    trust_checkpoint: bool = False  # load a checkpoint another run wrote (resuming unpickles: trust it like code)
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights for evaluation and export
    activation_checkpointing: bool = False  # recompute every encoder layer's activations in backward
    compile: bool = False  # torch.compile the model's repeated blocks and other parts, in place
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | ...
    compile_backend: str = "inductor"  # inductor; aot_eager or eager trace without generating kernels
    save: bool = True  # false: no checkpoints and no export, only the logs (benchmark runs)
    # Resuming on another number of processes: what keeps the global batch (processes x batch_size x grad_accum).
    # accum: grad_accum changes; batch: data.batch_size changes (each micro-step's gathered batch, so the loss, stays
    # as it was); rank: neither changes, and the global batch follows the number of processes. docs/checkpoints.md
    resize: str = "accum"
    record_samples: bool = False  # each rank writes the keys of every batch it trains on to <run>/samples/


RESIZE_MODES = ("accum", "batch", "rank")
STRATEGIES = ("ddp", "zero2", "zero3")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


# ---------------------------------------------------------------------------------------------------------------
# Stage I: contrastive modality-text pretraining
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EncoderSpec:
    arch: str = ""  # clip | vit (vision), bert (text), wav2vec2 (audio); auto: any transformers model of the modality
    pretrained: str | None = None  # hub name or local folder (from_pretrained)
    config: dict[str, Any] | None = None  # small random config (tests, demo)


@dataclass
class ContrastiveSection:
    pairs: list[str] = field(default_factory=lambda: ["vision_text", "audio_text"])  # emi.models.options.PAIRS
    vision: EncoderSpec | None = None
    text: EncoderSpec = field(default_factory=EncoderSpec)
    audio: EncoderSpec | None = None
    embed_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    local_loss: bool = True  # local rows against the global batch (OpenCLIP): O(B * global B) logits
    gather_with_grad: bool = True
    va_std_scale: float = 0.1  # s in w_i = 1 / (1 + sigma_i / s), see emi.models.losses


@dataclass
class Stage1Config:
    run: RunSection = field(default_factory=RunSection)
    data: Stage1Data = field(default_factory=Stage1Data)
    model: ContrastiveSection = field(default_factory=ContrastiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)


# ---------------------------------------------------------------------------------------------------------------
# Stage II: quality-aware fusion on frozen-encoder features
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class FusionSection:
    modalities: list[str] = field(default_factory=lambda: ["vision", "audio", "text"])
    temporal: bool = True  # the paper's TFE: TCN (vision) and gated BiLSTM (audio)
    fusion: str = "qam"  # qam | mean | concat | xattn | late: emi.models.options.FUSIONS, checked there
    d_model: int = 128
    num_segments: int = 8
    tcn_layers: int = 3
    tcn_kernel: int = 3
    lstm_hidden: int = 128
    transformer_layers: int = 2
    transformer_heads: int = 4
    dropout: float = 0.1
    modality_dropout: float = 0.0  # training: drop each modality of a clip with this probability (every fusion)


@dataclass
class LossSection:
    """Weights of the Stage II loss terms (emi.models.losses.RegressionLoss): e.g. MSE + (1 - mean Pearson) is
    `{mse: 1, pearson: 1}`, pure Pearson `{mse: 0, pearson: 1}`."""

    mse: float = 1.0
    pearson: float = 0.0
    ccc: float = 0.0
    unimodal: float = 1.0  # fusion "late": the same loss on each modality's own prediction, times this, averaged


@dataclass
class Stage2Config:
    run: RunSection = field(default_factory=RunSection)
    data: Stage2Data = field(default_factory=Stage2Data)
    labels: list[str] = field(
        default_factory=lambda: ["Admiration", "Amusement", "Determination", "Empathic Pain", "Excitement", "Joy"]
    )
    model: FusionSection = field(default_factory=FusionSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: many Stage II runs from one file (emi sweep, emi/sweep/)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SweepData:
    train: str = ""  # feature shards (emi features extract), as data.train of a run config
    val: str = ""  # the val set every cell is ranked on


@dataclass
class SweepSlurm:
    nodes: int = 1  # per cell
    gpus_per_node: int = 1  # one training process per GPU; 0: one process per node on the CPU
    cpus_per_node: int | None = None  # default: 10 per process
    partition: str | None = None
    time: int = 24 * 60  # minutes per cell job; a cell stopped by its time limit requeues itself and resumes
    parallelism: int = 1  # cells running at once (the job array's %N; --local: on this machine); 0: no limit


@dataclass
class SweepConfig:
    """Keys of `overrides`, `grid`, `repeat` and of each cell are dotted Stage II run-config keys."""

    name: str = "sweep"
    output_dir: str = "runs/sweeps"  # the sweep lives in <output_dir>/<name>/, each cell in <that>/cells/
    base: str = ""  # the Stage II run config every cell starts from
    # feature shards by name; a cell trains on the first one unless its cell or grid sets `dataset: NAME`
    data: dict[str, SweepData] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # settings of every cell
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)  # named variants: name -> {key: value}
    grid: dict[str, list[Any]] = field(default_factory=dict)  # key -> values; variants: cells x the product
    repeat: dict[str, list[Any]] = field(default_factory=dict)  # key -> values each variant runs with, aggregated
    metric: str = "mean_pearson"  # the val metric (best/trainer.json) that ranks cells; higher is better
    top_k: int = 3  # the k best cells on one val set are ensembled (mean of predictions); 0: no ensemble
    slurm: SweepSlurm = field(default_factory=SweepSlurm)


CONFIG_SCHEMAS = {"stage1": Stage1Config, "stage2": Stage2Config}  # what `emi config show` loads, by kind
CONFIG_KINDS = (*CONFIG_SCHEMAS, "sweep")
KIND_FOLDERS = {"stage1": "stage1", "stage2": "stage2", "sweeps": "sweep"}  # the shipped layout


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides, validation
# ---------------------------------------------------------------------------------------------------------------
def config_kind(path: Path) -> str:
    """What a config file configures (one of CONFIG_KINDS): its folder says (stage1/, stage2/, sweeps/), else its
    sections do (a sweep has a base, Stage I a model with pairs or encoders, Stage II labels, a loss or a fusion
    model); UsageError when neither does."""
    if path.parent.name in KIND_FOLDERS:
        return KIND_FOLDERS[path.parent.name]
    raw = read_config_file(path)
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if "base" in raw:
        return "sweep"
    if {"pairs", "vision", "text", "audio", "embed_dim"} & set(model):
        return "stage1"
    if "labels" in raw or "loss" in raw or {"fusion", "modalities", "d_model"} & set(model):
        return "stage2"
    raise UsageError(f"{path}: cannot tell which kind of config it is; say it with --kind ({', '.join(CONFIG_KINDS)})")


def load_config(schema: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read `path` (YAML; a path or a shipped config's name), apply `key.sub=value` overrides, validate against
    `schema`, return the dataclass."""
    path = resolve_config_path(path) if path else None
    raw = read_config_file(path) if path else {}
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, section_of(schema, key), value, override)
    return build_config(schema, raw, str(path) if path else "<defaults>")


def section_of(schema: type, key: str) -> str:
    """`key`, or where it is no key of `schema` but its last part names the key of exactly one section, that key,
    said on stderr: `train.lr=0.1` sets optim.lr, as a user who looked for the learning rate under train meant.
    Where the last part is in several sections or none, `key` as given (the config's check then names them)."""
    keys = dotted_keys(schema)
    if key in keys or any(key.startswith(known + ".") for known in keys):
        return key
    matches = [known for known in keys if known.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    if len(matches) != 1:
        return key
    print(f"emi: {key} is not a key of the config; set as {matches[0]}", file=sys.stderr)
    return matches[0]


def resolve_config_path(name: str | Path, beside: Path | None = None) -> Path:
    """The config file `name` names: a file relative to the current folder, else a shipped config
    (`stage1/tiny.yaml`). With `beside` (a sweep's base: the sweep file's folder), relative to that folder first,
    then a shipped config, then relative to the current folder. UsageError saying where it looked."""
    if beside is None:
        candidates = [Path(name), SHIPPED_CONFIGS / name]
    else:
        candidates = [beside / name, SHIPPED_CONFIGS / name, Path(name)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(candidate) for candidate in dict.fromkeys(candidates))
    raise UsageError(
        f"config file not found: {name} (looked for {looked}); `emi config list` names the shipped configs"
    )


def shipped_config_names() -> list[str]:
    """The shipped configs by name (`stage1/tiny.yaml`, `deepspeed/zero2.json`, ...), sorted."""
    return sorted(
        path.relative_to(SHIPPED_CONFIGS).as_posix()
        for path in SHIPPED_CONFIGS.rglob("*")
        if path.suffix in CONFIG_SUFFIXES
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path`, not yet validated."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"config {path}: a folder, not a file") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the top level must be a mapping of sections")
    return raw


def parse_override(override: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, value parsed as YAML)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"override {override!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def build_config(schema: type[T], raw: dict[str, Any], source: str) -> T:
    """Validate a raw mapping against `schema`; errors name `source`."""
    try:
        config = _build(schema, raw, source, prefix="")
    except UnknownKeyError as err:
        elsewhere = [key for key in dotted_keys(schema) if key.rsplit(".", 1)[-1] == err.name]
        raise UsageError(str(err) + (f"; did you mean {' or '.join(elsewhere)}?" if elsewhere else "")) from None
    validate(config, source)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def validate(config: Any, source: str) -> None:
    """Cross-field checks that types alone cannot express."""
    train = getattr(config, "train", None)
    if train is not None:
        _check_choice(train.strategy, STRATEGIES, "train.strategy", source)
        _check_choice(train.mixed_precision, MIXED_PRECISION, "train.mixed_precision", source)
        _check_choice(train.compile_mode, COMPILE_MODES, "train.compile_mode", source)
        _check_choice(train.compile_backend, COMPILE_BACKENDS, "train.compile_backend", source)
        _check_choice(train.resize, RESIZE_MODES, "train.resize", source)
        if train.grad_accum < 1 or train.keep_last < 1 or train.checkpoint_every < 1 or train.log_every < 1:
            raise UsageError(f"{source}: train.grad_accum, keep_last, checkpoint_every, log_every must be >= 1")
    data = getattr(config, "data", None)
    if isinstance(data, DataSection) and data.prefetch_factor < 1:  # a sweep's `data` names feature sets
        raise UsageError(f"{source}: data.prefetch_factor must be >= 1, got {data.prefetch_factor}")
    if isinstance(data, Stage1Data):
        validate_sources(data, source)
    folded = isinstance(data, Stage2Data) and (data.folds or data.fold)
    if folded and (data.folds < 2 or not 0 <= data.fold < data.folds):
        raise UsageError(
            f"{source}: data.folds must be >= 2 (or 0: no folds) and 0 <= data.fold < data.folds, "
            f"got folds={data.folds} fold={data.fold}"
        )
    if isinstance(config, Stage2Config):
        weights = config_to_dict(config.loss)
        unimodal = weights.pop("unimodal")
        if min(weights.values()) < 0 or not any(weights.values()):
            raise UsageError(f"{source}: loss weights must be >= 0 and one of them > 0, got {weights}")
        if unimodal < 0:
            raise UsageError(f"{source}: loss.unimodal must be >= 0, got {unimodal}")


# The prompt families a source may keep (emi.prompts reads which label columns belong to each).
PROMPT_FAMILIES = ("expression", "au", "va", "emi")


def validate_sources(data: Stage1Data, source: str) -> None:
    """data.sources: at least one, each with shards and a weight > 0, names unique; never beside data.train."""
    if data.epoch_samples < 0:
        raise UsageError(f"{source}: data.epoch_samples must be >= 0 (0: all the samples), got {data.epoch_samples}")
    if data.sources is None:
        return
    if data.train:
        raise UsageError(f"{source}: data.train and data.sources are both set; give the shards in one of them")
    if not data.sources:
        raise UsageError(f"{source}: data.sources is empty; list at least one source")
    for i, mixed in enumerate(data.sources):
        if not mixed.shards:
            raise UsageError(f"{source}: data.sources[{i}].shards is not set")
        if not mixed.weight > 0:
            raise UsageError(f"{source}: data.sources[{i}].weight must be > 0, got {mixed.weight}")
        unknown = sorted(set(mixed.prompts or ()) - set(PROMPT_FAMILIES))
        if unknown or mixed.prompts == []:
            named = unknown or "no family"
            raise UsageError(f"{source}: data.sources[{i}].prompts has {named}; choose among {list(PROMPT_FAMILIES)}")
    names = source_names(data.sources)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"{source}: data.sources has the name {twice[0]!r} twice; give each source its own name")


def _check_choice(value: str, choices: tuple[str, ...], key: str, source: str) -> None:
    if value not in choices:
        raise UsageError(f"{source}: {key} is {value!r}; choose one of {list(choices)}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, override: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


class UnknownKeyError(UsageError):
    """A key the schema does not have; `name` is its last part, by which build_config looks for it elsewhere."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def dotted_keys(schema: type) -> list[str]:
    """Every key of a schema, dotted through its sections (`optim.lr`, `model.vision.arch`, ...)."""
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = [h for h in typing.get_args(hint) if h is not type(None)] if optional else [hint]
        section = next((option for option in options if dataclasses.is_dataclass(option)), None)
        keys += [f"{name}.{key}" for key in dotted_keys(section)] if section else [name]
    return keys


def _build(schema: type[T], raw: Any, source: str, prefix: str) -> T:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise UnknownKeyError(
            f"{source}: unknown key {prefix + unknown[0]!r} in {where}; known keys: {', '.join(sorted(fields))}",
            unknown[0],
        )
    values = {name: _coerce(hints[name], raw[name], source, f"{prefix}{name}") for name in raw}
    return schema(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, source, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{source}: {key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{source}: {key} must be a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {name: _coerce(item, v, source, f"{key}.{name}") for name, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UsageError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value
