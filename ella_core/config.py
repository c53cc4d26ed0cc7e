"""Configuration of the Timestep-Aware Semantic Connector (TSC).

Defaults are the released SD1.5 connector (`ella-sd1.5-tsc-t5xl.safetensors`). Numeric conventions that
other code bases choose silently (the sinusoid's layout and frequency shift, the LayerNorm epsilon) are
pinned as class constants so a reader sees them in one place and the golden test guards them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

# Base-model families a connector can be made for, with the UNet context width each expects.
BASE_CONTEXT_WIDTH = {"sd15": 768, "sdxl": 2048}
SDXL_POOLED_DIM = 1280
INPUT_POOLS = (None, "mean")  # ELLAConfig.input_pool: None keeps every token; "mean" pools them into one
# Fields added after the first release, with their defaults: left out of the saved config at these values, so
# a default connector's file is the one written before they existed (same metadata, same tensor bytes).
LATER_FIELDS = {"time_aware": True, "input_pool": None}


@dataclass(frozen=True)
class ELLAConfig:
    input_dim: int = 2048  # LLM hidden size: flan-t5-xl 2048, SmolLM2-135M 576, Llama-3-8B 4096
    width: int = 768  # resampler width == UNet cross-attention width (SD1.5 768, SDXL 2048)
    layers: int = 6  # perceiver blocks
    heads: int = 8  # attention heads (the released value; not recorded by weight shapes)
    num_latents: int = 64  # output tokens handed to the UNet
    time_channel: int = 320  # sinusoidal timestep features
    time_embed_dim: int = 768  # width of the timestep MLP's output, which modulates every AdaLN
    pooled_dim: Optional[int] = None  # SDXL only: adds `pooled_proj` (see connector.ELLA.pooled)
    # Ablations (same weights and key names as the default connector, so files and init_from work both ways):
    time_aware: bool = True  # False: every t is treated as t = 0, so the context is the same at every step
    input_pool: Optional[str] = None  # "mean": the prompt's tokens are averaged into one before the resampler

    # Pinned conventions of the reference (SD UNet style timestep embedding); not configurable on purpose.
    FLIP_SIN_TO_COS = True  # cosine half first, then sine
    FREQ_SHIFT = 0.0  # exponent = -ln(max_period) * k / (half - shift)
    MAX_PERIOD = 10000.0
    NORM_EPS = 1e-6  # AdaLN's LayerNorm (no affine)
    MLP_RATIO = 4  # c_fc width = 4 * width

    def __post_init__(self) -> None:
        for name in ("input_dim", "width", "layers", "heads", "num_latents", "time_channel", "time_embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ELLAConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"ELLAConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.time_channel % 2:
            raise ValueError(f"ELLAConfig: time_channel must be even, got {self.time_channel}")
        if self.pooled_dim is not None and (not isinstance(self.pooled_dim, int) or self.pooled_dim <= 0):
            raise ValueError(f"ELLAConfig.pooled_dim must be a positive integer or None, got {self.pooled_dim!r}")
        if not isinstance(self.time_aware, bool):
            raise ValueError(f"ELLAConfig.time_aware must be true or false, got {self.time_aware!r}")
        if self.input_pool not in INPUT_POOLS:
            raise ValueError(f"ELLAConfig.input_pool must be one of {list(INPUT_POOLS)} (None: no pooling), "
                             f"got {self.input_pool!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields, without later fields at their defaults (see LATER_FIELDS)."""
        data = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if data[name] is default:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ELLAConfig":
        """Accepts our own field names and the reference constructor's (`out_dim`, `act_fn`)."""
        if not isinstance(data, dict):
            raise ValueError(f"ELLAConfig expects a mapping of field names to values, got {type(data).__name__} "
                             f"{str(data)[:60]}")
        data = dict(data)
        act = data.pop("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"ELLAConfig: only act_fn 'silu' is supported (the released value), got {act!r}")
        out_dim = data.pop("out_dim", None)
        if out_dim not in (None, data.get("time_embed_dim", cls.time_embed_dim)):
            raise ValueError(
                f"ELLAConfig: reference out_dim={out_dim} resizes only the time MLP and is not supported; "
                "the output width is `width`"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ELLAConfig: unknown config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def for_base(cls, base_model: str, **overrides: Any) -> "ELLAConfig":
        """Config for a base family: SD1.5 is the released layout; SDXL is width 2048 plus a pooled head."""
        if base_model not in BASE_CONTEXT_WIDTH:
            raise ValueError(f"unknown base model {base_model!r}; expected one of {sorted(BASE_CONTEXT_WIDTH)}")
        fields: dict[str, Any] = {"width": BASE_CONTEXT_WIDTH[base_model]}
        if base_model == "sdxl":
            fields["pooled_dim"] = SDXL_POOLED_DIM
        fields.update(overrides)
        return cls(**fields)
