"""Training configuration: one YAML file plus `section.key=value` command-line overrides.

The config is resolved once at start-up, validated, and saved into every checkpoint, so a run can be
reproduced and resumed from its own record. Sections mirror the story of the trainer: what model, what
text encoder, what connector, what data, how to optimise, how to train, what to sample for validation.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


@dataclass
class ModelConfig:
    pretrained: str = "runwayml/stable-diffusion-v1-5"  # diffusers folder, hub id, or single .safetensors/.ckpt
    base: str = "auto"  # "sd15" | "sdxl" | "auto" (SDXL when the UNet takes text_time added conditioning)
    single_file_config: Optional[str] = None  # diffusers config folder/hub id for from_single_file (offline use)
    prediction_type: Optional[str] = None  # "epsilon" | "v_prediction"; None: the scheduler's own
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" weights in a hub repo
    vae_dtype: Optional[str] = None  # None: the mixed-precision dtype; float32 for SDXL's VAE (overflows in fp16)


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
    path: Union[str, list[str]] = ""  # folder, manifest file, or tar shards: a list, a brace pattern, or URLs
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
    keep_checkpoints: int = 3  # 0: keep all
    log_every: int = 10
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    device: Optional[str] = None  # None: cuda:<local rank> when available, else cpu
    backend: Optional[str] = None  # torch.distributed backend; None: nccl on cuda, gloo on cpu
    collective_timeout_s: int = 1800  # a process waiting longer than this for the others fails instead of hanging
    stop_check_every: int = 10  # steps between the processes' exchanges of stop requests (SIGTERM/SIGINT)
    threads: Optional[int] = None  # CPU intra-op threads (torch.set_num_threads) at start-up; None: torch's default


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


# ---------------------------------------------------------------- the schema's rules beyond types
# Mirrors of ella_core.dtypes (the one dtype table), kept here as names so validation runs before torch is
# imported; tests/training/test_config_validation.py checks they equal what the table accepts.
DTYPE_NAMES = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16", "float", "half")  # training.models.DTYPES
LLM_DTYPE_NAMES = ("auto", "default", *DTYPE_NAMES, "fp8_e4m3fn", "fp8_e5m2", "float8_e4m3fn", "float8_e5m2")
_CHOICES = {
    "model.base": ("auto", "sd15", "sdxl"),
    "model.prediction_type": ("epsilon", "v_prediction"),
    "model.vae_dtype": DTYPE_NAMES,
    "llm.dtype": LLM_DTYPE_NAMES,
    "llm.token_mode": ("fixed", "flexible"),
    "data.format": ("auto", "folder", "jsonl", "csv", "webdataset"),
    "data.caption_rule": ("random", "first", "longest", "weighted"),
    "cache.latent_dtype": DTYPE_NAMES,
    "optim.schedule": ("constant", "cosine", "linear"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.backend": ("nccl", "gloo", "mpi", "ucc"),
}
_POSITIVE = ["train.batch_size", "train.grad_accum", "train.max_steps", "train.checkpoint_every", "train.log_every",
             "data.resolution", "data.bucket_step", "llm.max_length", "cache.shard_size", "connector.layers",
             "connector.heads", "connector.num_latents", "connector.time_channel", "connector.time_embed_dim",
             "optim.eps", "optim.max_grad_norm", "optim.schedule_steps", "train.min_snr_gamma",
             "train.collective_timeout_s", "train.stop_check_every", "train.threads", "validation.steps", "validation.height", "validation.width"]
_NON_NEGATIVE = ["optim.lr", "optim.weight_decay", "optim.warmup_steps", "train.noise_offset",
                 "train.keep_checkpoints", "data.num_workers", "validation.every"]
_REQUIRED = {  # empty values that cannot work, and what to put there
    "output_dir": "a folder for checkpoints and the final connector",
    "model.pretrained": "a diffusers folder, a hub id or a single-file checkpoint",
    "llm.source": "a T5/LLM folder, hub id, .gguf or single file",
    "data.path": "an image folder, a .jsonl/.csv manifest or tar shards",
    "data.image_column": "the manifest column holding image paths",
    "data.caption_columns": "the manifest/JSON field(s) holding captions",
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or raises TypeError/ValueError. YAML leaves `1e-4` and `1e4` strings (no dot), and
    reads paths such as `123` as numbers: those are converted; nothing else is guessed (`maybe` is no bool)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for alternative in (a for a in args if a is not type(None)):
            try:
                return _convert(value, alternative)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]  # one string is one item (not one item per character)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_convert(v, item) for v in value]
    if value is None:
        raise TypeError
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        number = float(value) if isinstance(value, (str, float)) else None
        if number is None or not math.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError
        return str(value)
    raise TypeError(f"unsupported field type {tp}")


def _build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    """Dataclass `cls` from a mapping, recursing into sections; every problem is appended to `errors`."""
    if not isinstance(data, dict):
        errors.append(f"{where.rstrip('.') or 'config'} must be a section (a mapping), got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        errors.append(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; known in "
                      f"{where.rstrip('.') or 'the top level'}: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        if name not in fields:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, {} if value is None else value, f"{where}{name}.", errors)
            continue
        if value is None and f"{where}{name}" in _REQUIRED:
            values[name] = [] if typing.get_origin(tp) is list else ""  # reported as "not set" below
            continue
        try:
            values[name] = _convert(value, tp)
        except (TypeError, ValueError):
            errors.append(f"{where}{name}={value!r}: must be {_type_name(tp)}")
    return cls(**values)


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


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
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw  # e.g. "a: b" or "[unclosed": kept as text, the schema then judges it
        _set_dotted(tree, key, value)
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
    """Config from a YAML file (or defaults when None) with overrides applied, then validated completely."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, llm:, data:, ...), got {data!r}")
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


def config_from_dict(data: dict[str, Any]) -> Config:
    errors: list[str] = []
    config = _build(Config, data, "", errors)
    errors += problems(config)  # values of the wrong type kept their defaults: no double report
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("\n  ".join([f"{len(errors)} problems in the config:"] + errors))
    return config


def _looks_local(value: str) -> bool:
    """An explicit filesystem path (hub ids like org/name and URLs are not checked)."""
    return value.startswith(("/", "./", "../", "~")) or (len(value) > 2 and value[1] == ":")


def problems(config: Config) -> list[str]:
    """Everything wrong with a typed config, before any model is loaded: ranges, choices, required values,
    combinations, and explicit paths that do not exist."""
    errors = []
    for dotted, allowed in _CHOICES.items():
        value = _get(config, dotted)
        if value is not None and value not in allowed:
            errors.append(f"{dotted}={value!r} is not one of {list(allowed)}")
    for dotted in _POSITIVE:
        value = _get(config, dotted)
        if value is not None and not value > 0:
            errors.append(f"{dotted}={value!r} must be > 0")
    for dotted in _NON_NEGATIVE:
        value = _get(config, dotted)
        if value is not None and value < 0:
            errors.append(f"{dotted}={value!r} must be >= 0")
    for dotted, what in _REQUIRED.items():
        value = _get(config, dotted)
        if value is None or value == "" or value == []:
            errors.append(f"{dotted} is not set: set it to {what}")
    d, o, t = config.data, config.optim, config.train
    if any(not c.strip() for c in d.caption_columns):
        errors.append(f"data.caption_columns={d.caption_columns!r} has an empty column name")
    if not 0.0 <= d.caption_dropout < 1.0:
        errors.append(f"data.caption_dropout={d.caption_dropout} must be in [0, 1)")
    if d.max_aspect < 1.0:
        errors.append(f"data.max_aspect={d.max_aspect} must be >= 1 (the longer side over the shorter)")
    if d.resolution > 0 and d.bucket_step > 0 and d.resolution % d.bucket_step:
        errors.append(f"data.resolution={d.resolution} must be a multiple of data.bucket_step={d.bucket_step}")
    if d.caption_rule == "weighted" and not d.caption_weights:
        errors.append("data.caption_rule=weighted needs data.caption_weights, e.g. [0.3, 0.7] per caption position")
    if d.caption_weights is not None and (any(w < 0 for w in d.caption_weights) or not sum(d.caption_weights) > 0):
        errors.append(f"data.caption_weights={d.caption_weights} must be >= 0 with a positive sum")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        errors.append(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        errors.append(f"train.ema_decay={t.ema_decay} must be in (0, 1)")
    if config.llm.token_mode != "fixed":
        errors.append("llm.token_mode=flexible cannot be batched for training (prompts differ in length); "
                      "train with fixed (the paper's 128 tokens); flexible is an inference option")
    if config.connector.time_channel % 2:
        errors.append(f"connector.time_channel={config.connector.time_channel} must be even (sin and cos halves)")
    for dotted in ("validation.height", "validation.width"):
        value = _get(config, dotted)
        if value is not None and value % 8:
            errors.append(f"{dotted}={value} must be a multiple of 8")
    if t.device is not None and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", t.device):
        errors.append(f"train.device={t.device!r} is not a device such as cpu, cuda or cuda:1")
    if config.cache.enabled is False and _resolved_format(d) == "webdataset":
        errors.append("data.path is webdataset shards, which are streamed, not indexed: keep cache.enabled=true "
                      "so they are read once into the feature cache")
    errors += _missing_paths(config)
    return errors


def _resolved_format(d: DataConfig) -> str:
    if d.format != "auto":
        return d.format
    p = d.path if isinstance(d.path, str) else (d.path[0] if d.path else "")
    if isinstance(d.path, list) or ".tar" in p or p.startswith(("http://", "https://", "pipe:")):
        return "webdataset"
    if p.endswith(".jsonl"):
        return "jsonl"
    if p.endswith(".csv"):
        return "csv"
    return "folder"


def _missing_paths(config: Config) -> list[str]:
    errors = []
    for dotted in ("model.pretrained", "model.single_file_config", "llm.source", "llm.tokenizer"):
        value = _get(config, dotted)
        if value and _looks_local(value) and not Path(value).expanduser().exists():
            errors.append(f"{dotted}={value}: no such file or folder")
    init = config.connector.init_from
    if init and not Path(init).expanduser().is_file():
        errors.append(f"connector.init_from={init}: no such file (a connector .safetensors)")
    path = config.data.path
    fmt = _resolved_format(config.data)
    if path and isinstance(path, str) and fmt != "webdataset" and not Path(path).expanduser().exists():
        errors.append(f"data.path={path}: no such {'folder' if fmt == 'folder' else 'manifest file'}")
    resume = config.train.resume
    if resume and resume != "latest" and not (Path(resume).expanduser() / "trainer_state.json").is_file():
        errors.append(f"train.resume={resume}: not a checkpoint folder (no trainer_state.json); "
                      "use latest or a <output_dir>/checkpoints/step-<N> folder")
    return errors


# ---------------------------------------------------------------- resume: which differences matter
RESULT_NEUTRAL = ("output_dir", "train.resume", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.device", "train.backend", "train.collective_timeout_s",
                  "train.stop_check_every",
                  "data.num_workers", "cache.dir", "cache.shard_size", "validation.")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_changes(saved: dict[str, Any], current: Config, saved_world: int = 1, world: int = 1) -> list[str]:
    """`key: old -> new` for the settings that differ from a checkpoint's and change what is trained.
    max_steps counts only when it moves the lr schedule's end (schedule_steps unset, schedule not constant);
    batch_size only when batch_size x processes (the global micro-batch) changes."""
    old, new = _flatten(saved), _flatten(current.to_dict())
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESULT_NEUTRAL) or old.get(key) == new.get(key):
            continue
        if key == "train.max_steps" and (current.optim.schedule == "constant" or current.optim.schedule_steps):
            continue
        if key == "train.batch_size" and old.get(key, 0) * saved_world == new[key] * world:
            continue
        changes.append(f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    return changes


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
