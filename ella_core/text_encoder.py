"""The frozen LLM that turns prompts into ELLA's input features.

Decisions (see docs/CONTRACT.md, encoder section):
- Features come back as float32 on the module's current device, whatever dtype the LLM ran in (lossless
  for fp16/bf16; the connector casts to its own dtype anyway). `EncodedText.dtype` says what the LLM ran in.
- Flexible mode encodes every prompt on its own (no padding ever reaches the LLM), so batching never changes
  a prompt's features; the batch is then zero-padded to the longest prompt, with `attention_mask` and
  `token_counts` marking the valid tokens. Use `EncodedText.prompt_features(i)` to get one prompt's tokens.
- Half precision without a CPU kernel ("... not implemented for 'Half'") falls back to fp32 with a warning.
- fp16 overflow (inf/NaN, or T5 hidden states at transformers' fp16 clamp value) is recomputed in fp32
  with a warning and flagged in `EncodedText.overflow_recomputed`; never returned silently. The recompute
  swaps fp32 copies in for the half-precision tensors and then puts the very same tensor objects back, so
  the encoder is left exactly as loaded (T5's fp32 `wo` layers stay fp32, fp8 weights stay fp8).
- The device is read from the module's parameters at every call: ComfyUI may have moved it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .dtypes import Precision
from .llm_loading import TextEncoderError, load_llm
from .tokenization import PromptTokenizer, TokenCount, check_mode, load_tokenizer

logger = logging.getLogger(__name__)

# transformers' T5 clamps fp16 hidden states at finfo(fp16).max - 1000 instead of letting them reach inf;
# a value that large means the layer overflowed even though the output looks finite.
_FP16_CLAMP = torch.finfo(torch.float16).max - 1000


class WidthMismatchError(ValueError):
    """An LLM's hidden size differs from the connector's input_dim."""


def check_width(
    encoder_hidden_size: int, connector_input_dim: int, llm_name: str = "the LLM", connector_name: str = "the connector"
) -> None:
    """Raise a message naming both sides when an LLM's features cannot feed a connector."""
    if int(encoder_hidden_size) != int(connector_input_dim):
        raise WidthMismatchError(
            f"LLM {llm_name} outputs width {encoder_hidden_size} but connector {connector_name} expects "
            f"input_dim {connector_input_dim}; use the LLM the connector was trained with"
        )


@dataclass
class EncodedText:
    features: torch.Tensor  # (B, L, D) float32, on the LLM's device; fixed mode: L == max_length
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens
    token_counts: list[int]  # real tokens per prompt (special tokens included)
    dropped: list[int]  # tokens truncation removed per prompt (fixed mode)
    dropped_text: list[str]  # the text those tokens came from
    mode: str = "fixed"
    dtype: torch.dtype = torch.float32  # dtype the LLM computed in (fp32 after a fallback or recompute)
    overflow_recomputed: bool = False
    warnings: list[str] = field(default_factory=list)

    def prompt_features(self, index: int) -> torch.Tensor:
        """(1, L_i, D): the positions the connector should see for prompt `index` (all of them in fixed mode)."""
        if self.mode == "fixed":
            return self.features[index : index + 1]
        return self.features[index : index + 1, : self.token_counts[index]]


@contextmanager
def _half_tensors_in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """fp32 copies of every fp16/bf16 parameter and buffer for the duration; then the originals, untouched.

    (`model.to(fp32); model.to(fp16)` would not restore a model whose dtypes are mixed, e.g. T5's `wo`
    layers that transformers keeps in fp32.) fp8 weights stay: ella_core.cast_weights casts them to fp32.
    """
    saved = []
    try:  # the copies are made inside the try: an out-of-memory half-way still restores what was swapped
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in list(table.items()):
                    if tensor is not None and tensor.dtype in (torch.float16, torch.bfloat16):
                        copy = tensor.detach().float()
                        is_param = table is module._parameters
                        table[name] = torch.nn.Parameter(copy, requires_grad=False) if is_param else copy
                        saved.append((table, name, tensor))
        yield
    finally:
        for table, name, tensor in saved:
            table[name] = tensor


def _missing_half_kernel(error: RuntimeError) -> bool:
    text = str(error)
    return "not implemented for" in text and ("'Half'" in text or "'BFloat16'" in text)


class LLMTextEncoder:
    """A frozen LLM and its tokenizer. `.model` is the torch module to hand to a model manager."""

    def __init__(self, model: torch.nn.Module, tokenizer: PromptTokenizer, family: str, name: str = "LLM",
                 hidden_layer: int | None = None) -> None:  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.name = name
        self.hidden_layer = hidden_layer
        self.fell_back_to_fp32 = False
        self.precision: Precision | None = None  # as loaded (ella_core.dtypes), when load_text_encoder made it
        layers = self.num_layers
        if hidden_layer is not None and not -(layers + 1) <= hidden_layer <= layers:
            raise TextEncoderError(
                f"{name}: hidden_layer {hidden_layer} is out of range; this model has {layers} layers, so "
                f"hidden states 0..{layers} (0 = embeddings, {layers} or -1 = last) or -{layers + 1}..-1"
            )

    # ------------------------------------------------------------ properties read from the module itself
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def num_layers(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "num_layers", None) or cfg.num_hidden_layers)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the input embeddings (fp8-stored Linear weights are cast to it)."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------ tokens
    def count_tokens(self, prompt: str, max_length: int = 128, mode: str = "fixed") -> TokenCount:
        return self.tokenizer.count_tokens(prompt, max_length=max_length, mode=mode)

    # ------------------------------------------------------------ encoding
    def encode(self, prompts: str | list[str], *, mode: str = "fixed", max_length: int = 128) -> EncodedText:
        """prompts (B strings) -> EncodedText with features (B, L, hidden_size) float32."""
        check_mode(mode, max_length)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        tokenized = [self.tokenizer.tokenize(p, mode=mode, max_length=max_length) for p in prompts]
        ids = [t[0] for t in tokenized]
        counts = [t[1] for t in tokenized]
        notes: list[str] = []
        if mode == "fixed":
            input_ids, mask = self.tokenizer.pad(ids, max_length)
            features, overflow = self._encode_batch(input_ids, mask, notes)
        else:  # one prompt at a time: no padding, so batch composition cannot change any prompt's features
            parts = []
            overflow = False
            for seq in ids:
                input_ids, mask = self.tokenizer.pad([seq], len(seq))
                out, hit = self._encode_batch(input_ids, mask, notes)
                parts.append(out[0])
                overflow |= hit
            longest = max(len(seq) for seq in ids)
            features = parts[0].new_zeros((len(parts), longest, parts[0].shape[-1]))
            for row, part in enumerate(parts):
                features[row, : part.shape[0]] = part
            mask = self.tokenizer.pad(ids, longest)[1]
        for count in counts:
            if count.dropped:
                notes.append(
                    f"prompt truncated to {count.kept} of {count.total} tokens; dropped: {count.dropped_text!r}"
                )
        return EncodedText(
            features=features, attention_mask=mask.to(features.device), token_counts=[c.kept for c in counts],
            dropped=[c.dropped for c in counts], dropped_text=[c.dropped_text for c in counts], mode=mode,
            dtype=torch.float32 if overflow else self.dtype, overflow_recomputed=overflow, warnings=notes,
        )  # fmt: skip

    def _encode_batch(self, input_ids: torch.Tensor, mask: torch.Tensor, notes: list[str]) -> tuple[torch.Tensor, bool]:
        """(B, L) ids + mask -> ((B, L, D) float32 features, whether an fp16/bf16 overflow forced fp32)."""
        features, saturated = self._forward_with_fallback(input_ids, mask, notes)
        if self.dtype != torch.float32 and (saturated or not torch.isfinite(features).all()):
            message = (
                f"{self.name}: {self.dtype} overflowed while encoding (inf/NaN or saturated hidden states); "
                "recomputed this prompt in float32 (use dtype fp32 or bf16 to avoid the recompute)"
            )
            logger.warning(message)
            notes.append(message)
            with _half_tensors_in_fp32(self.model):
                features, _ = self._forward(input_ids, mask)
            self._check_finite(features)
            return features, True
        self._check_finite(features)
        return features, False

    def _check_finite(self, features: torch.Tensor) -> None:
        if not torch.isfinite(features).all():
            raise TextEncoderError(
                f"{self.name}: the LLM produced inf/NaN features even in {self.dtype}; its weights are broken"
            )

    def _forward_with_fallback(self, input_ids, mask, notes) -> tuple[torch.Tensor, bool]:
        try:
            return self._forward(input_ids, mask)
        except RuntimeError as error:
            if self.dtype == torch.float32 or not _missing_half_kernel(error):
                raise
            message = (
                f"{self.name}: this device has no {self.dtype} kernel for an op the LLM needs ({error}); "
                "switched the text encoder to float32 (uses twice the memory of fp16)"
            )
            logger.warning(message)
            notes.append(message)
            self.model.to(torch.float32)
            self.fell_back_to_fp32 = True
            return self._forward(input_ids, mask)

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """-> (B, L, D) float32 features, and whether a T5 block hit transformers' fp16 clamp value."""
        device = self.device  # read now: ComfyUI may have moved the module since the last call
        saturated = [False]
        hooks = []
        if self.family == "t5" and self.dtype == torch.float16:

            def watch(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if hidden.abs().amax() >= _FP16_CLAMP:
                    saturated[0] = True

            hooks = [block.register_forward_hook(watch) for block in self.model.encoder.block]
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        if self.family == "decoder":
            kwargs["use_cache"] = False
        if self.hidden_layer is not None:
            kwargs["output_hidden_states"] = True
        try:
            output = self.model(**kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = output.last_hidden_state if self.hidden_layer is None else output.hidden_states[self.hidden_layer]
        return hidden.float(), saturated[0]


def load_text_encoder(
    source: str,
    *,
    tokenizer: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    hidden_layer: int | None = None,
    trust_remote_code: bool = False,
    family: str | None = None,
    fallback_t5_tokenizer: str | None = None,
) -> LLMTextEncoder:
    """Load a T5-family encoder or a decoder LLM (folder | hub id | .safetensors [+ tokenizer] | .gguf).

    dtype: a name of ella_core.dtypes: None/"auto" -> fp16 for T5 (what the released connector saw), bf16 for
    decoders; "fp16", "bf16", "fp32"; "fp8_e4m3fn"/"fp8_e5m2" store Linear weights in fp8 and compute in the
    family default. hidden_layer: index into the hidden states (0 = embeddings, -1 = last, the default).
    fallback_t5_tokenizer: tokenizer folder for a single T5 file with none beside it (e.g. ComfyUI's).
    """
    loaded = load_llm(source, tokenizer=tokenizer, dtype=dtype, trust_remote_code=trust_remote_code, family=family,
                      fallback_t5_tokenizer=fallback_t5_tokenizer)
    if device is not None:
        loaded.model.to(device)
    prompt_tokenizer = PromptTokenizer(loaded.tokenizer, loaded.family)
    encoder = LLMTextEncoder(loaded.model, prompt_tokenizer, loaded.family, name=loaded.name, hidden_layer=hidden_layer)
    encoder.precision = loaded.precision
    return encoder


__all__ = [
    "EncodedText",
    "LLMTextEncoder",
    "TextEncoderError",
    "TokenCount",
    "WidthMismatchError",
    "check_width",
    "load_text_encoder",
    "load_tokenizer",
]
