"""Training configuration: one YAML file plus `section.key=value` command-line overrides.

The config is resolved once at start-up, validated, and saved into every checkpoint, so a run can be
reproduced and resumed from its own record. Sections mirror the story of the trainer: what model, what
text encoder, what connector, what data, how to optimise, how to train, what to sample for validation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class ModelConfig:
    pretrained: str = "runwayml/stable-diffusion-v1-5"  # diffusers folder, hub id, or single .safetensors/.ckpt
    base: str = "auto"  # "sd15" | "sdxl" | "auto" (SDXL when the UNet takes text_time added conditioning)
    single_file_config: Optional[str] = None  # diffusers config folder/hub id for from_single_file (offline use)
    prediction_type: Optional[str] = None  # "epsilon" | "v_prediction"; None: the scheduler's own
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" weights in a hub repo


@dataclass
class LLMConfig:
    source: str = "google/flan-t5-xl"  # anything ella_core.load_text_encoder loads
    tokenizer: Optional[str] = None
    dtype: str = "float16"  # the released connector was trained with fp16 T5
    hidden_layer: Optional[int] = None  # None: last hidden state
    token_mode: str = "fixed"  # fixed length (pad/truncate) as in the paper
    max_length: int = 128
    device: Optional[str] = None  # None: the training device


@dataclass
class ConnectorConfig:
    init_from: Optional[str] = None  # existing connector (.safetensors) to fine-tune; None: from scratch
    layers: int = 6
    heads: int = 8
    num_latents: int = 64
    time_channel: int = 320
    time_embed_dim: int = 768


@dataclass
class CacheConfig:
    enabled: bool = True  # precompute VAE latents and LLM features once; the LLM is then not loaded to train
    dir: Optional[str] = None  # None: <output_dir>/cache; the settings' hash names a subfolder
    shard_size: int = 256  # samples per safetensors shard
    latent_dtype: str = "float32"


@dataclass
class DataConfig:
    format: str = "auto"  # "folder" | "jsonl" | "csv" | "webdataset" | "auto" (from the path)
    path: str = ""  # folder, manifest file, or tar shards: a list, a brace pattern, or URLs
    image_column: str = "image"  # jsonl/csv: column holding the image path (relative to the manifest)
    caption_columns: list[str] = field(default_factory=lambda: ["caption"])  # one or more caption columns
    caption_rule: str = "random"  # "random" | "first" | "longest" | "weighted"
    caption_weights: Optional[list[float]] = None  # "weighted": weight per caption position
    caption_dropout: float = 0.0  # probability of the empty-prompt encoding (for classifier-free guidance)
    resolution: int = 512  # bucket area is about resolution^2
    buckets: bool = True  # aspect-ratio buckets; False: centre square crops
    bucket_step: int = 64  # bucket sides are multiples of this
    max_aspect: float = 2.0
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4  # paper: 1e-4 for SD1.5, 1e-5 for SDXL
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    schedule: str = "constant"  # "constant" | "cosine" | "linear" (after warmup)
    warmup_steps: int = 0
    schedule_steps: Optional[int] = None  # length of the decay; None: train.max_steps


@dataclass
class TrainConfig:
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    max_steps: int = 10000  # optimizer steps
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (frozen models run in it; connector master weights fp32)
    gradient_checkpointing: bool = False  # of the frozen UNet
    compile: bool = False  # torch.compile the connector
    min_snr_gamma: Optional[float] = None  # e.g. 5.0 (Hang et al. 2023)
    noise_offset: float = 0.0
    ema_decay: Optional[float] = None  # e.g. 0.9999; None: no EMA
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    device: Optional[str] = None  # None: cuda:<local rank> when available, else cpu
    backend: Optional[str] = None  # torch.distributed backend; None: nccl on cuda, gloo on cpu


@dataclass
class ValidationConfig:
    every: int = 0  # steps; 0: never
    prompts: list[str] = field(default_factory=list)
    steps: int = 25
    guidance_scale: float = 7.5
    height: Optional[int] = None  # None: data.resolution
    width: Optional[int] = None
    seed: int = 0


@dataclass
class Config:
    output_dir: str = "runs/ella"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


_CHOICES = {
    "model.base": ("auto", "sd15", "sdxl"),
    "model.prediction_type": (None, "epsilon", "v_prediction"),
    "llm.token_mode": ("fixed", "flexible"),
    "data.format": ("auto", "folder", "jsonl", "csv", "webdataset"),
    "data.caption_rule": ("random", "first", "longest", "weighted"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Dataclass `cls` from a dict, recursing into nested sections; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value or {}, f"{where}{name}.")
        else:
            values[name] = _coerce(value, str(fields[name].type), f"{where}{name}")
    return cls(**values)


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """YAML reads 1e-4 (no dot) as a string and paths like 123 as ints: convert by the field's type."""
    try:
        if isinstance(value, str) and "float" in annotation and "list" not in annotation:
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and annotation.startswith(("str", "Optional[str]")):
            return str(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a number") from None
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["train.max_steps=5", "data.path=x"] -> nested dict; values parsed as YAML (numbers, lists, null)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key == "resume":  # convenience: resume=latest
            key = "train.resume"
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or defaults when None) with overrides applied, then validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    data = _merge(data, parse_overrides(list(overrides)))
    config = _build(Config, data, "")
    validate(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    config = _build(Config, data, "")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that catch typos and impossible settings before any model is loaded."""
    for dotted, allowed in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {[a for a in allowed if a is not None]}")
    positive = ["train.batch_size", "train.grad_accum", "train.max_steps", "train.checkpoint_every",
                "train.log_every", "data.resolution", "data.bucket_step", "llm.max_length", "cache.shard_size"]
    for dotted in positive:
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{dotted} must be a positive integer, got {value!r}")
    if not 0.0 <= config.data.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout must be in [0, 1), got {config.data.caption_dropout}")
    if config.data.resolution % config.data.bucket_step:
        raise ConfigError(
            f"data.resolution {config.data.resolution} must be a multiple of data.bucket_step {config.data.bucket_step}")
    if config.data.caption_rule == "weighted" and not config.data.caption_weights:
        raise ConfigError("data.caption_rule=weighted needs data.caption_weights, e.g. [0.3, 0.7] per caption position")
    if config.train.ema_decay is not None and not 0.0 < config.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1), got {config.train.ema_decay}")
    if config.llm.token_mode != "fixed":
        raise ConfigError("llm.token_mode=flexible cannot be batched for training (prompts differ in length); "
                          "train with fixed (the paper's 128 tokens); flexible is an inference option")
    if isinstance(config.data.caption_columns, str):
        config.data.caption_columns = [config.data.caption_columns]
    if not config.data.path:
        raise ConfigError("data.path is empty: set it to an image folder, a .jsonl/.csv manifest or tar shards")


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
