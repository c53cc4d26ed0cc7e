"""Training configuration: one YAML file plus `section.key=value` command-line overrides.

The config is resolved once at start-up, validated, and saved into every checkpoint, so a run can be
reproduced and resumed from its own record. Sections mirror the story of the trainer: what model, what
text encoder, what connector, what data, how to optimise, how to train, what to sample for validation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
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
    revision: Optional[str] = None  # hub revision (branch, tag or commit) of model.pretrained
    variant: Optional[str] = None  # e.g. "fp16" weights in a hub repo
    vae_dtype: Optional[str] = None  # None: the mixed-precision dtype; float32 for SDXL's VAE (overflows in fp16)


@dataclass
class LLMConfig:
    source: str = "google/flan-t5-xl"  # anything ella_core.load_text_encoder loads
    tokenizer: Optional[str] = None  # tokenizer folder/hub id; None: the one beside llm.source
    dtype: str = "float16"  # the released connector was trained with fp16 T5
    hidden_layer: Optional[int] = None  # None: last hidden state
    token_mode: str = "fixed"  # fixed length (pad/truncate) as in the paper
    max_length: int = 128  # tokens per caption (paper: 128)
    device: Optional[str] = None  # None: the training device


@dataclass
class ConnectorConfig:
    init_from: Optional[str] = None  # existing connector (.safetensors) to fine-tune; None: from scratch
    layers: int = 6  # Perceiver blocks
    heads: int = 8  # attention heads per block
    num_latents: int = 64  # output tokens (the UNet context length)
    time_channel: int = 320  # sinusoidal timestep features
    time_embed_dim: int = 768  # timestep embedding width (modulates the layer norms)
    # ablations (docs/training.md, "Ablations and evaluation hooks"); they apply to init_from connectors too
    time_aware: bool = True  # false: the resampler without timestep (t = 0 at every step: one context per prompt)
    input_pool: Optional[str] = None  # "mean": the LLM tokens averaged into one before the resampler; null: all tokens


@dataclass
class CacheConfig:
    # what is computed once and stored (docs/training.md, "Feature cache", weighs disk against GPU time):
    # full: VAE latents and LLM features; the LLM is not loaded to train
    # latents: VAE latents and the captions; the LLM stays on each process's device and encodes every batch
    # none: nothing; the VAE and the LLM run on every batch (image folders and manifests, not tar shards)
    # The old `enabled: true|false` still reads as mode full|none.
    mode: str = "full"  # full | latents | none: what is cached and what runs on every batch (docs/training.md)
    dir: Optional[str] = None  # None: $ELLA_TSC_CACHE_DIR or ~/.cache/ella-tsc/features, shared by runs; "{output_dir}/cache" per run; a hash of the settings names a subfolder
    shard_size: int = 256  # samples per safetensors shard
    latent_dtype: str = "float32"  # dtype of the stored VAE latents
    open_shards: int = 16  # shard files a reader keeps open (per DataLoader worker), least recently used closed

    @property
    def enabled(self) -> bool:
        """Whether there is a cache folder at all (modes full and latents)."""
        return self.mode != "none"


@dataclass
class DataConfig:
    format: str = "auto"  # "folder" | "jsonl" | "csv" | "webdataset" | "auto" (from the path)
    path: Union[str, list[str]] = ""  # folder, manifest file, or tar shards: a list, a brace pattern, or URLs
    image_column: str = "image"  # jsonl/csv: column holding the image path (relative to the manifest)
    caption_extension: Union[str, list[str]] = ".txt"  # folders: caption file beside each image (kohya: .caption); a list: the first that exists
    caption_columns: list[str] = field(default_factory=lambda: ["caption"])  # one or more caption columns
    caption_rule: str = "random"  # "random" | "first" | "longest" | "weighted"
    caption_weights: Optional[list[float]] = None  # "weighted": weight per caption position
    caption_dropout: float = 0.0  # probability of the empty-prompt encoding (for classifier-free guidance)
    resolution: int = 512  # bucket area is about resolution^2
    buckets: bool = True  # aspect-ratio buckets; False: centre square crops
    bucket_step: int = 64  # bucket sides are multiples of this
    max_aspect: float = 2.0  # longest bucket side over the shortest
    num_workers: int = 0  # loader processes: decode/resize for the cache build and the online path
    streaming: Optional[bool] = None  # no cache: stream the source in parts (training/streaming.py); None: stream webdataset sources, index folders and manifests


@dataclass
class OptimConfig:
    lr: float = 1e-4  # paper: 1e-4 for SD1.5, 1e-5 for SDXL
    weight_decay: float = 0.01  # AdamW (paper: 0.01)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW beta1, beta2
    eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: Optional[float] = 1.0  # gradient clipping; null: none
    schedule: str = "constant"  # "constant" | "cosine" | "linear" (after warmup)
    warmup_steps: int = 0  # linear warm-up from 0 to optim.lr
    schedule_steps: Optional[int] = None  # length of the decay; None: the run's length (max_steps or max_epochs)


@dataclass
class TrainConfig:
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: Optional[int] = 10000  # optimizer steps; with max_epochs whichever ends first; null: max_epochs alone
    max_epochs: Optional[int] = None  # passes over the training samples; null: max_steps alone
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (frozen models run in it; connector master weights fp32)
    gradient_checkpointing: bool = False  # of the frozen UNet
    compile: bool = False  # torch.compile the connector
    min_snr_gamma: Optional[float] = None  # e.g. 5.0 (Hang et al. 2023)
    noise_offset: float = 0.0  # offset noise strength (0: none)
    ema_decay: Optional[float] = None  # e.g. 0.9999; None: no EMA
    checkpoint_every: int = 1000  # steps between resumable checkpoints
    keep_checkpoints: int = 3  # 0: keep all
    log_every: int = 10  # steps between metrics records
    report_to: str = "tensorboard"  # "tensorboard" | "wandb" | "none" (metrics.jsonl is always written)
    wandb_project: str = "ella-tsc"  # report_to=wandb: the project (WANDB_MODE=offline etc. are honoured)
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    device: Optional[str] = None  # None: cuda:<local rank> when available, else cpu
    backend: Optional[str] = None  # torch.distributed backend; None: nccl on cuda, gloo on cpu
    collective_timeout_s: int = 1800  # a process waiting longer than this for the others fails instead of hanging
    stop_check_every: int = 10  # steps between the processes' exchanges of stop requests (SIGTERM/SIGINT)
    threads: Optional[int] = None  # CPU intra-op threads (torch.set_num_threads) at start-up; None: torch's default


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validations (loss and images); 0: never
    holdout: Union[int, float] = 0  # samples kept out of training for val/loss: a count, or a fraction below 1
    prompts: list[str] = field(default_factory=list)  # prompts of the validation images
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance ("" as trained)
    images_per_prompt: int = 1  # images sampled per prompt (different noise)
    steps: int = 25  # DDIM steps of the validation images
    guidance_scale: float = 7.5  # classifier-free guidance scale
    height: Optional[int] = None  # None: data.resolution
    width: Optional[int] = None  # None: data.resolution
    seed: int = 0  # noise of the images, and the held-out samples' fixed noise and timesteps
    hooks: list[str] = field(default_factory=list)  # "pkg.module:function" or "file.py:function": evaluation hooks


@dataclass
class Config:
    output_dir: str = "runs/ella"  # checkpoints, ella.safetensors, logs, metrics
    seed: int = 0  # data order, caption choice, noise and the initial connector
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
    "cache.mode": ("full", "latents", "none"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.backend": ("nccl", "gloo", "mpi", "ucc"),
    "train.report_to": ("tensorboard", "wandb", "none"),
}
CONNECTOR_POOLS = ("mean",)  # ella_core.config.INPUT_POOLS without None (not imported: no torch here)
_POSITIVE = ["train.batch_size", "train.grad_accum", "train.max_steps", "train.checkpoint_every", "train.log_every",
             "data.resolution", "data.bucket_step", "llm.max_length", "cache.shard_size", "cache.open_shards", "connector.layers",
             "connector.heads", "connector.num_latents", "connector.time_channel", "connector.time_embed_dim",
             "optim.eps", "optim.max_grad_norm", "optim.schedule_steps", "train.min_snr_gamma",
             "train.collective_timeout_s", "train.stop_check_every", "train.threads", "validation.steps",
             "validation.height", "validation.width", "train.max_epochs", "validation.images_per_prompt"]
_NON_NEGATIVE = ["optim.lr", "optim.weight_decay", "optim.warmup_steps", "train.noise_offset",
                 "train.keep_checkpoints", "data.num_workers", "validation.every", "validation.holdout"]
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
        from .cli import suggest  # the table of other trainers' flag names

        advice = [h for h in (suggest(f"{where}{k}", _shown(data[k])) for k in unknown) if h]
        errors.append(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; known in "
                      f"{where.rstrip('.') or 'the top level'}: {sorted(fields)}" + "".join(f"; {h}" for h in advice))
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


def _shown(value: Any) -> Optional[str]:
    return None if isinstance(value, dict) else json.dumps(value) if not isinstance(value, str) else value


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


def parse_value(key: str, raw: str) -> Any:
    """One override's value. `[...]`, `{...}` and quoted values are YAML flow syntax (`["a, b", "c"]` is two
    items); an invalid one is refused, never read as text. Anything else is a YAML scalar when it is one
    (numbers, true/false, null) and otherwise the text exactly as given: `a cat, sitting: #1` is one string
    (for a list key, one item), its commas, colons and `#` kept; so is `{output_dir}/cache` (not a whole
    `{...}`)."""
    text = raw.strip()
    if text == "":
        return None
    if text[0] in "[\"'" or (text[0] == "{" and text[-1] == "}"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {key}={raw}: not valid YAML flow syntax ({problem}); write lists as "
                              f"{key}='[\"first, with a comma\", second]' (quoted for the shell)") from e
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if value is None or isinstance(value, (bool, int, float)) else text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["train.max_steps=5", "data.path=x"] -> nested dict; values by `parse_value`."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key == "resume":  # convenience: resume=latest
            key = "train.resume"
        _set_dotted(tree, key, parse_value(key, raw))
    return tree


def _legacy_cache_enabled(tree: dict[str, Any], where: str, errors: list[str]) -> dict[str, Any]:
    """`cache.enabled: true|false` (the old spelling) as `cache.mode: full|none`, within one layer (the file or
    the overrides), so an override in either spelling replaces the file's setting in either spelling."""
    cache = tree.get("cache")
    if not isinstance(cache, dict) or "enabled" not in cache:
        return tree
    cache = dict(cache)
    enabled = cache.pop("enabled")
    mode = cache.get("mode")
    if not isinstance(enabled, bool):
        errors.append(f"cache.enabled={enabled!r}: must be true or false (or use cache.mode: full, latents or none)")
    elif mode is None:
        cache["mode"] = "full" if enabled else "none"
    elif (mode != "none") != enabled:
        errors.append(f"{where} sets both cache.enabled={str(enabled).lower()} and cache.mode={mode}, which "
                      "contradict each other: keep cache.mode (full, latents or none) only")
    return {**tree, "cache": cache}


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
    errors: list[str] = []
    data = _legacy_cache_enabled(data, str(path), errors)
    overrides_tree = _legacy_cache_enabled(parse_overrides(list(overrides)), "the command line", errors)
    return config_from_dict(_merge(data, overrides_tree), errors)


def config_from_dict(data: dict[str, Any], errors: Optional[list[str]] = None) -> Config:
    """The typed config, or ConfigError listing every problem (`errors`: ones already found while reading)."""
    errors = list(errors or [])
    data = _legacy_cache_enabled(data, "the config", errors)
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
    if t.max_steps is None and t.max_epochs is None:
        errors.append("train.max_steps and train.max_epochs are both null: set one (the run ends at the first reached)")
    errors += extension_problems(d.caption_extension)
    holdout = config.validation.holdout
    if isinstance(holdout, float) and not holdout < 1.0:
        errors.append(f"validation.holdout={holdout}: a count (integer) or a fraction below 1, e.g. 100 or 0.01")
    if t.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        errors.append("train.report_to=wandb needs the wandb package, which is not installed: pip install wandb "
                      "(or train.report_to=tensorboard / none)")
    if config.connector.input_pool is not None and config.connector.input_pool not in CONNECTOR_POOLS:
        errors.append(f"connector.input_pool={config.connector.input_pool!r} is not one of "
                      f"{['null', *CONNECTOR_POOLS]} (null: every token; mean: the tokens averaged into one)")
    if config.connector.time_channel % 2:
        errors.append(f"connector.time_channel={config.connector.time_channel} must be even (sin and cos halves)")
    for dotted in ("validation.height", "validation.width"):
        value = _get(config, dotted)
        if value is not None and value % 8:
            errors.append(f"{dotted}={value} must be a multiple of 8")
    if t.device is not None and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", t.device):
        errors.append(f"train.device={t.device!r} is not a device such as cpu, cuda or cuda:1")
    streaming = streamed_run(config)
    if config.cache.mode == "none" and d.streaming is False and _resolved_format(d) == "webdataset":
        errors.append("data.path is webdataset shards, which are streamed, not indexed: leave data.streaming unset "
                      "(or true) to train from the stream, or use cache.mode=full / latents to read them once into a cache")
    if streaming and config.validation.holdout:
        errors.append("validation.holdout needs an indexed source, and this run streams its data (data.streaming, "
                      "cache.mode=none): use cache.mode=latents or full, or validation.holdout=0")
    if streaming and t.max_steps is None:
        errors.append("train.max_epochs alone cannot size a streamed run (its number of samples is only known at "
                      "the end of the first epoch): set train.max_steps")
    errors += _missing_paths(config)
    if config.validation.hooks:  # imported now, so a bad spec fails before any model loads
        from .hooks import hook_problems

        errors += hook_problems(config.validation.hooks)
    return errors


def caption_extensions(value: Union[str, list[str]]) -> list[str]:
    """data.caption_extension as the list of suffixes to try, each with its dot ("caption" -> ".caption")."""
    items = [value] if isinstance(value, str) else list(value)
    return [e if e.startswith(".") else f".{e}" for e in (i.strip() for i in items)]


def extension_problems(value: Union[str, list[str]]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or any(not i.strip() or i.strip() in (".",) or "/" in i or "\\" in i for i in items):
        return [f"data.caption_extension={value!r}: a file suffix such as .txt or .caption (or a list of them)"]
    return []


def cache_root(config: Config) -> Path:
    """Where feature caches live. Shared by default, so runs with other output_dirs but the same data and
    settings reuse a cache (the subfolder is a hash of the settings); `{output_dir}` in cache.dir is replaced."""
    if config.cache.dir:
        return Path(config.cache.dir.replace("{output_dir}", config.output_dir)).expanduser()
    if os.environ.get("ELLA_TSC_CACHE_DIR"):
        return Path(os.environ["ELLA_TSC_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ella-tsc" / "features"


def streamed_run(config: Config) -> bool:
    """training.streaming.streams() from the settings alone (that one asks the data readers for the format;
    tests/training/test_streaming_config.py keeps the two in step)."""
    d = config.data
    return config.cache.mode == "none" and (d.streaming if d.streaming is not None
                                            else _resolved_format(d) == "webdataset")


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
# cache.mode (and the old cache.enabled): the three modes train on the same latents, captions and features
# (tests/training/test_online_encoding.py), so a resume may switch between them
RESULT_NEUTRAL = ("output_dir", "train.resume", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.device", "train.backend", "train.collective_timeout_s",
                  "train.stop_check_every",
                  "data.num_workers", "cache.dir", "cache.shard_size", "cache.open_shards", "cache.mode", "cache.enabled",
                  "validation.", "train.report_to", "train.wandb_project")
RESULT_CHANGING = ("validation.holdout",)  # the held-out samples are not trained on


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
    # keys a checkpoint predates are compared as their defaults (they were added with the earlier behaviour)
    old, new = {**_flatten(Config().to_dict()), **_flatten(saved)}, _flatten(current.to_dict())
    changes = []
    for key in sorted(set(old) | set(new)):
        if (key.startswith(RESULT_NEUTRAL) and key not in RESULT_CHANGING) or old.get(key) == new.get(key):
            continue
        if key in ("train.max_steps", "train.max_epochs") and (current.optim.schedule == "constant"
                                                               or current.optim.schedule_steps):
            continue
        if key == "train.batch_size" and old.get(key, 0) * saved_world == new[key] * world:
            continue
        changes.append(f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    return changes


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
