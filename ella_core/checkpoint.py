"""Connector checkpoints: strict loading in the reference key layout, self-describing saving.

A file carries its connector config and how its LLM features were produced (model, dtype, token length
and mode) as safetensors metadata, so one file is enough to rebuild and feed the connector. Files without
metadata (the released SD1.5 connector) get their config from tensor shapes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import BASE_CONTEXT_WIDTH, ELLAConfig
from .connector import ELLA
from .file_modes import match_umask
from .state_dicts import layout_problems

FORMAT = "ella-connector"
FORMAT_VERSION = "1"
DEFAULT_HEADS = 8  # the released value; attention heads leave no trace in weight shapes
RELEASED_LLM = "google/flan-t5-xl"
TOKEN_MODES = ("fixed", "flexible")  # ella_core.tokenization.MODES (not imported: no tokenizer deps here)

StateDict = Mapping[str, torch.Tensor]
Source = Union[str, os.PathLike, StateDict]


class ELLACheckpointError(ValueError):
    """A connector file or state dict that does not describe a valid connector."""


@dataclass(frozen=True)
class EllaMetadata:
    """How a connector was made. `None` means the file does not say (and no safe default exists)."""

    config: Optional[ELLAConfig] = None
    base_model: Optional[str] = None  # "sd15" | "sdxl"
    llm: Optional[str] = None  # hub id or name of the LLM whose features it was trained on
    llm_dtype: Optional[str] = None  # dtype the LLM ran in during training, e.g. "float16"
    llm_hidden_layer: Optional[int] = None  # None: last hidden state
    token_length: Optional[int] = None
    token_mode: Optional[str] = None  # "fixed" | "flexible"
    extra: dict[str, str] = field(default_factory=dict)  # anything else a trainer recorded
    # Fields guessed from the tensors (files without metadata), not stated by the file: they describe, but
    # never override what a user chose (ella_core.encoding_settings).
    inferred: tuple[str, ...] = field(default=(), compare=False)

    _FIELDS = ("base_model", "llm", "llm_dtype", "llm_hidden_layer", "token_length", "token_mode")
    _INT_FIELDS = ("llm_hidden_layer", "token_length")

    def to_safetensors(self) -> dict[str, str]:
        out = {key: str(value) for key, value in self.extra.items()}
        out["format"] = FORMAT
        out["format_version"] = FORMAT_VERSION
        if self.config is not None:
            out["ella_config"] = self.config.to_json()
        for name in self._FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[f"ella_{name}"] = str(value)
        return out

    @classmethod
    def from_safetensors(cls, raw: Mapping[str, str]) -> "EllaMetadata":
        """Parse a file's metadata; ValueError names the key and the value that is wrong."""
        raw = dict(raw or {})
        values: dict[str, Any] = {}
        key = "ella_config" if "ella_config" in raw else "config"
        config_json = raw.pop("ella_config", None) or raw.pop("config", None)
        if config_json:
            values["config"] = _parse_config(key, config_json)
        for name in cls._FIELDS:
            value = raw.pop(f"ella_{name}", None)
            if value is not None:
                values[name] = _parse_field(f"ella_{name}", name, value)
        raw.pop("format", None)
        raw.pop("format_version", None)
        return cls(extra=raw, **values)

    @classmethod
    def coerce(cls, metadata: Union["EllaMetadata", Mapping[str, Any], None]) -> "EllaMetadata":
        """Accepts an EllaMetadata or a plain dict using the field names (unknown keys go to `extra`)."""
        if metadata is None:
            return cls()
        if isinstance(metadata, cls):
            return metadata
        data = dict(metadata)
        values: dict[str, Any] = {}
        for name in ("config",) + cls._FIELDS:
            if name in data:
                values[name] = data.pop(name)
        if isinstance(values.get("config"), Mapping):
            values["config"] = ELLAConfig.from_dict(values["config"])
        extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.pop("extra", {}).items()}
        extra.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()})
        return cls(extra=extra, **values)


def _parse_config(key: str, text: str) -> ELLAConfig:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"metadata key '{key}' is not valid JSON ({e}): {text[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"metadata key '{key}' must be a JSON object of connector fields "
                         f"(input_dim, width, layers, ...), got {type(data).__name__} {text[:80]}")
    try:
        return ELLAConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"metadata key '{key}': {e}") from None


def _parse_field(key: str, name: str, value: str) -> Any:
    """One `ella_*` metadata value, checked: integers are integers, the mode and base family are known."""
    if name in EllaMetadata._INT_FIELDS:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"metadata key '{key}' must be an integer, got {value!r}") from None
        if name == "token_length" and number < 1:
            raise ValueError(f"metadata key '{key}' must be a positive integer, got {number}")
        return number
    if name == "token_mode" and value not in TOKEN_MODES:
        raise ValueError(f"metadata key '{key}' must be one of {list(TOKEN_MODES)}, got {value!r}")
    if name == "base_model" and value not in BASE_CONTEXT_WIDTH:
        raise ValueError(f"metadata key '{key}' must be one of {sorted(BASE_CONTEXT_WIDTH)}, got {value!r}")
    return value


def check_declared_config(config: ELLAConfig, shapes: Mapping[str, Any], where: str) -> None:
    """The config a file declares agrees with its tensor shapes: checked from shapes alone, before any
    module is built (a forged `layers: 3000, width: 65536` must not cost seconds or gigabytes to refuse)."""
    found = infer_config(shapes, heads=1, where=where)  # heads leave no trace in shapes
    wrong = [f"{name}={getattr(config, name)} (tensors say {getattr(found, name)})"
             for name in ("input_dim", "width", "layers", "num_latents", "time_channel", "time_embed_dim", "pooled_dim")
             if getattr(config, name) != getattr(found, name)]
    if wrong:
        raise ELLACheckpointError(f"{where}: the config in its metadata does not match its tensors: " + ", ".join(wrong))


def _expected_shapes(config: ELLAConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in _meta_module(config).state_dict().items()}


def _meta_module(config: ELLAConfig) -> ELLA:
    with torch.device("meta"):
        return ELLA(config)


def infer_config(state_dict: StateDict, heads: Optional[int] = None, where: str = "state dict") -> ELLAConfig:
    """Config from tensor shapes; `heads` from metadata, else the released 8."""
    required = ("connector.latents", "connector.proj_in.weight", "time_embedding.linear_1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        sample = sorted(state_dict)[:5]
        raise ELLACheckpointError(
            f"{where} is not an ELLA connector: missing {missing}; its first keys are {sample}. "
            "Expected the reference layout (time_embedding.*, connector.*)"
        )
    num_latents, width = state_dict["connector.latents"].shape
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"connector\.perceiver_blocks\.(\d+)\.", k))}
    time_embed_dim, time_channel = state_dict["time_embedding.linear_1.weight"].shape
    pooled = state_dict.get("pooled_proj.weight")
    heads = heads or DEFAULT_HEADS
    if width % heads:
        raise ELLACheckpointError(
            f"{where}: width {width} is not divisible by {heads} heads; the file records no head count, "
            "so save it with metadata (ella_core.save_ella) naming `heads`"
        )
    return ELLAConfig(
        input_dim=int(state_dict["connector.proj_in.weight"].shape[1]),
        width=int(width),
        layers=len(blocks),
        heads=heads,
        num_latents=int(num_latents),
        time_channel=int(time_channel),
        time_embed_dim=int(time_embed_dim),
        pooled_dim=None if pooled is None else int(pooled.shape[0]),
    )


def check_state_dict(state_dict: StateDict, config: ELLAConfig, where: str = "state dict") -> None:
    """Strict check: the exact key set and every shape of `config`; all values finite."""
    problems = layout_problems({k: tuple(v.shape) for k, v in state_dict.items()}, _expected_shapes(config))
    if problems:
        raise ELLACheckpointError(
            f"{where} does not match the ELLA connector layout for {config}: " + "; ".join(problems)
        )
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ELLACheckpointError(f"{where} holds NaN or inf values in {len(bad)} tensors (first: {bad[:4]})")


def _read(source: Source) -> tuple[dict[str, torch.Tensor], EllaMetadata, str]:
    if isinstance(source, Mapping):
        return dict(source), EllaMetadata(), "state dict"
    path = Path(source)
    where = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"ELLA connector file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                raw_meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise ELLACheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        try:
            meta = EllaMetadata.from_safetensors(raw_meta)
        except (ValueError, TypeError) as e:
            raise ELLACheckpointError(f"{path} has invalid ELLA metadata: {e}") from e
        return tensors, meta, where
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ELLACheckpointError(f"{path} could not be loaded as weights only (pickled code is refused): {e}") from e
        if not isinstance(loaded, Mapping):
            raise ELLACheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict")
        return dict(loaded), EllaMetadata(), where
    raise ELLACheckpointError(f"{path}: unsupported file type {path.suffix!r}; use .safetensors")


def _fill_defaults(meta: EllaMetadata, config: ELLAConfig) -> EllaMetadata:
    """Files without metadata: base family from the width; the released layout implies flan-t5-xl fp16 @128."""
    base = meta.base_model or {v: k for k, v in BASE_CONTEXT_WIDTH.items()}.get(config.width)
    released_like = config.input_dim == 2048 and config.width == 768
    filled = replace(
        meta,
        config=config,
        base_model=base,
        llm=meta.llm or (RELEASED_LLM if released_like else None),
        llm_dtype=meta.llm_dtype or ("float16" if released_like else None),
        token_length=meta.token_length or (128 if released_like else None),
        token_mode=meta.token_mode or ("fixed" if released_like else None),
    )
    guessed = tuple(name for name in EllaMetadata._FIELDS
                    if getattr(meta, name) is None and getattr(filled, name) is not None)
    return replace(filled, inferred=tuple(dict.fromkeys(meta.inferred + guessed)))


def load_ella_with_metadata(
    source: Source, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None
) -> tuple[ELLA, EllaMetadata]:
    """Like `load_ella`, also returning what the file says about how it was made."""
    tensors, meta, where = _read(source)
    if meta.config is not None:
        check_declared_config(meta.config, tensors, where)
    config = meta.config or infer_config(tensors, where=where)
    check_state_dict(tensors, config, where)
    if dtype is None:
        float_dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    module = _meta_module(config)
    module.load_state_dict(tensors, strict=True, assign=True)
    module = module.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
    return module, _fill_defaults(meta, config)


def load_ella(
    path_or_state_dict: Source, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None
) -> ELLA:
    """Connector from a .safetensors file (or weights-only torch file, or a state dict), strictly checked.

    The config comes from the file's metadata when present, else from tensor shapes (heads default to 8).
    The module is returned in eval mode with gradients off; dtype defaults to the file's.
    """
    return load_ella_with_metadata(path_or_state_dict, device=device, dtype=dtype)[0]


def read_ella_metadata(path: Union[str, os.PathLike]) -> EllaMetadata:
    """Metadata of a connector file without building the module (shapes are read from the header only)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            try:
                meta = EllaMetadata.from_safetensors(f.metadata() or {})
            except ValueError as e:
                raise ELLACheckpointError(f"{path} has invalid ELLA metadata: {e}") from e
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            if meta.config is None:
                meta = replace(meta, config=infer_config(shapes, where=str(path)))
            else:
                check_declared_config(meta.config, shapes, str(path))
    except (FileNotFoundError, ELLACheckpointError):
        raise
    except Exception as e:  # safetensors' own errors for truncated or corrupt headers
        raise ELLACheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return _fill_defaults(meta, meta.config)


def unwrap(module: torch.nn.Module) -> ELLA:
    """The ELLA inside DDP/FSDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while not isinstance(module, ELLA):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"save_ella expects an ella_core.ELLA module, got {type(module).__name__}")
        module = inner
    return module


def save_ella(
    module: torch.nn.Module,
    path: Union[str, os.PathLike],
    metadata: Union[EllaMetadata, Mapping[str, Any], None] = None,
) -> None:
    """Write the connector as safetensors in the reference key layout, with self-describing metadata.

    Written to a temporary file in the same folder and renamed, so a crash never leaves a half-written file.
    """
    ella = unwrap(module)
    meta = replace(EllaMetadata.coerce(metadata), config=ella.config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ella.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ELLACheckpointError(f"refusing to save {path}: NaN or inf in {len(bad)} tensors (first: {bad[:4]})")
    atomic_save_file(tensors, path, meta.to_safetensors())


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                     metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors written to a temporary file beside `path`, synced, then renamed: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        match_umask(tmp)  # mkstemp made it 0600: readable by the user's group/others as the umask allows
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
