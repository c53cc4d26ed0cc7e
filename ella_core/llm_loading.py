"""Finding and loading the frozen LLM behind ELLA, from whatever form users keep it in.

Sources: a Hugging Face folder, a hub id (normal download), a single `.safetensors` state dict plus a
tokenizer folder (config from a config.json beside it or in the tokenizer folder, or inferred from the
shapes for T5 encoders as ComfyUI users keep them), or a single `.gguf` file (transformers' GGUF loader).
T5-family models load encoder-only; every other architecture loads as the base model (no LM head).
Weights come only from safetensors, GGUF or `torch.load(weights_only=True)`; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .cast_weights import store_linear_weights
from .dtypes import Precision, PrecisionError, parse_precision
from .gguf_check import GGUFFileError, check_gguf_file
from .state_dicts import layout_problems

T5_MODEL_TYPES = ("t5", "umt5", "mt5")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# ComfyUI 0.3.75's own floor; the loading code below is tested on it and on the newest release.
MIN_TRANSFORMERS = "4.50.3"


class TextEncoderError(ValueError):
    """A text-encoder file, folder or setting that cannot be used; the message names it and the fix."""


@dataclass
class LoadedLLM:
    model: torch.nn.Module  # encoder-only T5 or a decoder's base model, eval mode, requires_grad False
    tokenizer: Any  # a transformers tokenizer
    family: str  # "t5" | "decoder"
    name: str  # what the user pointed at, for messages
    precision: Precision  # storage and compute dtype it was loaded in


def transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:3])


def check_transformers() -> None:
    """Refuse a transformers older than the floor with a message naming both versions."""
    import transformers

    floor = tuple(int(p) for p in MIN_TRANSFORMERS.split("."))
    if transformers_version() < floor:
        raise TextEncoderError(
            f"ELLA's text encoders need transformers>={MIN_TRANSFORMERS}, but {transformers.__version__} is "
            f"installed; run: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


def hf_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained` keyword for the weights dtype: `dtype=` since transformers 4.56, `torch_dtype=` before."""
    return {"dtype" if transformers_version() >= (4, 56) else "torch_dtype": dtype}


def _precision(dtype: str | torch.dtype | Precision | None, family: str) -> Precision:
    try:
        return parse_precision(dtype, family)
    except PrecisionError as error:
        raise TextEncoderError(str(error)) from None


def family_of(model_type: str) -> str:
    return "t5" if model_type in T5_MODEL_TYPES else "decoder"


def has_tokenizer(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _t5_class(model_type: str):
    import transformers

    return {
        "t5": transformers.T5EncoderModel,
        "umt5": transformers.UMT5EncoderModel,
        "mt5": transformers.MT5EncoderModel,
    }[model_type]


def model_class_for(config) -> type:
    """Encoder-only class for T5-family configs, the base model (AutoModel) for decoder LLMs."""
    import transformers

    if config.model_type in T5_MODEL_TYPES:
        return _t5_class(config.model_type)
    if getattr(config, "is_encoder_decoder", False):
        raise TextEncoderError(
            f"model type {config.model_type!r} is an encoder-decoder other than T5/UMT5/MT5; "
            "ELLA supports T5-family encoders and decoder-only LLMs"
        )
    return transformers.AutoModel


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _check_loading_info(info: dict, name: str) -> None:
    """transformers random-initialises missing weights with only a warning; for ELLA that is an error."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing:
        raise TextEncoderError(
            f"{name}: {len(missing)} weights the model needs are missing from the checkpoint "
            f"(e.g. {missing[:5]}); the file is partial or for another architecture"
        )
    if mismatched:
        raise TextEncoderError(f"{name}: weights with the wrong shape: {mismatched[:5]}")


# ---------------------------------------------------------------- tokenizers


def load_hf_tokenizer(path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False, name: str = ""):
    """A transformers tokenizer from a folder or hub id (or a GGUF file's embedded vocabulary)."""
    from transformers import AutoTokenizer

    if gguf_file is None and os.path.isdir(path) and not has_tokenizer(path):
        raise TextEncoderError(
            f"{name or path}: no tokenizer found in {path} (looked for {', '.join(TOKENIZER_FILES)}); "
            "pass the folder holding the model's tokenizer files"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise TextEncoderError(f"{name or path}: could not load the tokenizer from {path}: {error}") from error


def _tokenizer_candidates(path: str) -> tuple[str, ...]:
    stem = os.path.splitext(os.path.abspath(path))[0]
    folder = os.path.dirname(stem)
    return (stem + "_tokenizer", stem, os.path.join(folder, "tokenizer"), folder)


def tokenizer_beside(path: str) -> str | None:
    """Tokenizer folder of a single weights file: `<stem>_tokenizer/`, `<stem>/`, `tokenizer/` or its own folder."""
    return next((c for c in _tokenizer_candidates(path) if has_tokenizer(c)), None)


_fallback_t5_tokenizer: str | None = None


def set_fallback_t5_tokenizer(folder: str | None) -> None:
    """Tokenizer folder for single-file T5 encoders with none beside them (the node pack sets ComfyUI's)."""
    global _fallback_t5_tokenizer
    _fallback_t5_tokenizer = os.fspath(folder) if folder else None


def is_t5_encoder_file(path: str) -> bool:
    """A .safetensors file whose header holds T5 encoder keys (read without loading any tensor)."""
    if not path.lower().endswith(".safetensors"):
        return False
    try:
        return looks_like_t5(_peek_shapes(path))
    except TextEncoderError:
        return False


def tokenizer_location(
    source: str, tokenizer: str | None, fallback_t5_tokenizer: str | None = None
) -> tuple[str, str | None]:
    """(folder or hub id, gguf file) of the tokenizer that belongs to `source`.

    A single T5 encoder file with no tokenizer beside it uses `fallback_t5_tokenizer` (default: the folder
    given to set_fallback_t5_tokenizer): every T5/flan-T5 checkpoint shares the same SentencePiece vocabulary.
    """
    if tokenizer is not None:
        if not os.path.exists(tokenizer) and not _HUB_ID.match(tokenizer):
            raise TextEncoderError(f"tokenizer folder {tokenizer} does not exist")
        return tokenizer, None
    if source.lower().endswith(".gguf"):
        return os.path.dirname(os.path.abspath(source)), source
    if os.path.isfile(source):
        beside = tokenizer_beside(source)
        if beside is not None:
            return beside, None
        fallback = fallback_t5_tokenizer or _fallback_t5_tokenizer
        if fallback and has_tokenizer(fallback) and is_t5_encoder_file(source):
            return fallback, None
        raise TextEncoderError(
            f"{source}: a single weights file carries no tokenizer, and none was found beside it "
            f"({', '.join(_tokenizer_candidates(source))}); "
            "pass tokenizer=<folder with the model's tokenizer files> (for T5: ComfyUI's "
            "comfy/text_encoders/t5_tokenizer)"
        )
    return source, None


# ---------------------------------------------------------------- T5 state dicts (ComfyUI style)


def _strip_to_t5_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Drop a wrapper prefix (e.g. `text_encoders.t5xxl.transformer.`) and any decoder / LM head."""
    anchor = next((k for k in state if k.endswith("encoder.final_layer_norm.weight")), None)
    prefix = anchor[: -len("encoder.final_layer_norm.weight")] if anchor else ""
    out = {}
    for key, value in state.items():
        if prefix and not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key.startswith(("decoder.", "lm_head.")):
            continue
        out[key] = value
    if "shared.weight" not in out and "encoder.embed_tokens.weight" in out:  # same tensor under its tied name
        out["shared.weight"] = out["encoder.embed_tokens.weight"]
    return out


def looks_like_t5(shapes: dict[str, tuple[int, ...]]) -> bool:
    keys = _strip_to_t5_keys(shapes)
    return "encoder.block.0.layer.0.SelfAttention.q.weight" in keys and (
        "shared.weight" in keys or "encoder.embed_tokens.weight" in keys
    )


def infer_t5_config(shapes: dict[str, tuple[int, ...]], name: str):
    """A T5Config/UMT5Config from a T5 encoder state dict's shapes (ComfyUI's t5xxl files have no config)."""
    from transformers import T5Config, UMT5Config

    keys = _strip_to_t5_keys(shapes)
    emb = keys.get("shared.weight") or keys.get("encoder.embed_tokens.weight")
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    if emb is None or not blocks:
        raise TextEncoderError(f"{name}: not a T5 encoder state dict (no shared.weight / encoder.block.N keys)")
    if blocks != set(range(len(blocks))):
        raise TextEncoderError(f"{name}: encoder blocks {sorted(set(range(max(blocks) + 1)) - blocks)} are missing")
    bias = keys.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if bias is None:
        raise TextEncoderError(f"{name}: block 0 has no relative_attention_bias; cannot infer the T5 head count")
    inner = keys["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    heads = bias[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
    d_ff = keys["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    # UMT5 gives every block its own position bias; T5 and MT5 only the first.
    per_block_bias = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    cls = UMT5Config if per_block_bias else T5Config
    return cls(
        vocab_size=emb[0], d_model=emb[1], d_kv=inner // heads, d_ff=d_ff, num_layers=len(blocks),
        num_heads=heads, relative_attention_num_buckets=bias[0],
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip


# ---------------------------------------------------------------- single files


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file only if it loads with weights_only=True (no arbitrary unpickling)."""
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise TextEncoderError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TextEncoderError(
            f"{path}: refusing to load: it is not loadable with torch.load(weights_only=True) ({error}). "
            "Convert it to .safetensors"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TextEncoderError(f"{path}: does not hold a plain state dict of tensors")
    return state


def _config_for_file(path: str, tokenizer_dir: str | None, shapes: dict[str, tuple[int, ...]], trust_remote_code: bool):
    from transformers import AutoConfig

    for folder in (os.path.dirname(os.path.abspath(path)), tokenizer_dir):
        if folder and os.path.isfile(os.path.join(folder, "config.json")):
            return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if looks_like_t5(shapes):
        return infer_t5_config(shapes, path)
    raise TextEncoderError(
        f"{path}: no config.json beside it or in the tokenizer folder ({tokenizer_dir}), and its keys are not a "
        "T5 encoder's, so the architecture cannot be inferred; put the model's config.json next to the file"
    )


def _normalise_keys(state: dict[str, Any], expected: dict[str, tuple[int, ...]], config) -> dict[str, Any]:
    """Map a file's keys onto the encoder-only / base model's keys."""
    if config.model_type in T5_MODEL_TYPES:
        return _strip_to_t5_keys(state)
    if any(k.startswith("model.") for k in state) and not any(k.startswith("model.") for k in expected):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}  # a *ForCausalLM file
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


def check_state_dict(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], optional: set[str], name: str
) -> None:
    """Key set and shapes against the model built from the config; the message names file and numbers."""
    problems = layout_problems(shapes, expected, optional)
    if problems:
        raise TextEncoderError(f"{name}: the weights do not fit the model's config: " + ", ".join(problems))


def _tied_keys(cls) -> set[str]:
    """Keys the model fills by tying (T5's encoder.embed_tokens.weight <- shared.weight): optional in files."""
    tied = getattr(cls, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()


def load_single_file(path: str, config, dtype: torch.dtype, trust_remote_code: bool):
    """A state dict file and its config -> the model, after checking keys and shapes against the config."""
    state = read_state_dict(path)
    cls = model_class_for(config)
    if cls.__name__ == "AutoModel":
        from transformers import AutoModel

        with torch.device("meta"):
            skeleton = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        cls = type(skeleton)
    else:
        with torch.device("meta"):
            skeleton = cls(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    state = _normalise_keys(state, expected, config)
    check_state_dict({k: tuple(v.shape) for k, v in state.items()}, expected, _tied_keys(cls), path)
    del skeleton
    # transformers casts to `dtype` itself, keeping its _keep_in_fp32_modules (T5's `wo`) in fp32 as the
    # README's fp16 recipe writes them: pre-casting here would round those to fp16 first.
    model, info = cls.from_pretrained(
        None, config=config, state_dict=state, output_loading_info=True, **hf_dtype_kwargs(dtype)
    )
    _check_loading_info(info, path)
    return model


# ---------------------------------------------------------------- entry point


def _load_pretrained(source: str, config, dtype: torch.dtype, trust_remote_code: bool, name: str, **kwargs):
    import pickle

    cls = model_class_for(config)
    try:
        model, info = cls.from_pretrained(
            source, config=config, trust_remote_code=trust_remote_code, output_loading_info=True,
            **hf_dtype_kwargs(dtype), **kwargs,
        )  # fmt: skip
    except (pickle.UnpicklingError, OSError) as error:  # transformers < 4.56 wraps the unpickling error
        unpickling = _in_chain(error, pickle.UnpicklingError)
        if unpickling is None:
            raise
        error = unpickling
        raise TextEncoderError(
            f"{name}: refusing to load: its .bin weights are not loadable with torch.load(weights_only=True) "
            f"({str(error).splitlines()[0]}). Convert them to .safetensors"
        ) from error
    _check_loading_info(info, name)
    return model


def _in_chain(error: BaseException, cls: type) -> BaseException | None:
    """`error` or the first exception of type `cls` among its causes / contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, cls):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _folder_weights_kwargs(folder: str) -> dict[str, Any]:
    files = os.listdir(folder)
    if any(f.endswith(".safetensors") for f in files):
        return {"use_safetensors": True}
    if any(f.endswith((".bin", ".pt", ".pth")) for f in files):
        return {"use_safetensors": False, "weights_only": True}  # transformers refuses pickles beyond tensors
    raise TextEncoderError(f"{folder}: no .safetensors (or .bin) weight files in the folder")


def load_llm(
    source: str,
    *,
    tokenizer: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    family: str | None = None,
    fallback_t5_tokenizer: str | None = None,
) -> LoadedLLM:
    """Resolve `source` (folder | hub id | .safetensors/.pt | .gguf), load model + tokenizer, frozen, on CPU.

    dtype: a name of ella_core.dtypes (None/"auto": the family default). fp8 names load in the compute dtype,
    then hold the Linear weights in fp8 (ella_core.cast_weights).
    """
    from transformers import AutoConfig

    check_transformers()
    source = os.fspath(source)
    name = source
    lower = source.lower()
    local = os.path.exists(source) or tokenizer is not None
    tok_path, tok_gguf = tokenizer_location(source, tokenizer, fallback_t5_tokenizer) if local else (source, None)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise TextEncoderError(f"{source}: the folder has no config.json; it is not a Hugging Face model folder")
    if os.path.isfile(source) and lower.endswith(".gguf"):
        try:
            check_gguf_file(source)  # a cut-short file fails here in milliseconds, not in the tokenizer's parse
        except GGUFFileError as error:
            raise TextEncoderError(str(error)) from error
    if local:  # the tokenizer is cheap and fails fast, so load it before the weights
        hf_tokenizer = load_hf_tokenizer(tok_path, gguf_file=tok_gguf, trust_remote_code=trust_remote_code, name=name)

    if os.path.isfile(source) and lower.endswith(".gguf"):
        folder = os.path.dirname(os.path.abspath(source))
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=source)
        except Exception as error:
            raise TextEncoderError(f"{source}: transformers cannot read this GGUF file ({error})") from error
        fam = _resolve_family(config, family, name)
        precision = _precision(dtype, fam)
        model = _load_pretrained(folder, config, precision.compute, trust_remote_code, name, gguf_file=source)
    elif os.path.isfile(source):
        if not lower.endswith((".safetensors", ".bin", ".pt", ".pth")):
            raise TextEncoderError(f"{source}: unsupported file type; expected .safetensors, .gguf or a HF folder")
        tokenizer_dir = tok_path if os.path.isdir(tok_path) else None
        state_shapes = _peek_shapes(source)
        config = _config_for_file(source, tokenizer_dir, state_shapes, trust_remote_code)
        fam = _resolve_family(config, family, name)
        precision = _precision(dtype, fam)
        model = load_single_file(source, config, precision.compute, trust_remote_code)
    elif os.path.isdir(source):
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (ValueError, OSError, KeyError) as error:  # unknown model_type, custom code without trust, bad JSON
            raise TextEncoderError(f"{source}: transformers cannot use its config.json: {error}") from error
        fam = _resolve_family(config, family, name)
        precision = _precision(dtype, fam)
        model = _load_pretrained(
            source, config, precision.compute, trust_remote_code, name, **_folder_weights_kwargs(source)
        )
    elif _HUB_ID.match(source) and not lower.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth")):
        try:  # the normal hub download (cached by huggingface_hub); weights_only refuses pickled code
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            fam = _resolve_family(config, family, name)
            precision = _precision(dtype, fam)
            model = _load_pretrained(source, config, precision.compute, trust_remote_code, name, weights_only=True)
        except OSError as error:
            raise TextEncoderError(
                f"{source}: not a local file or folder, and downloading it from the Hugging Face hub failed "
                f"(offline, or no such repository): {error}"
            ) from error
    else:
        raise TextEncoderError(
            f"text encoder {source!r} not found: not an existing file or folder, nor a hub id (owner/name)"
        )

    if not local:  # hub id: the tokenizer comes with the download
        hf_tokenizer = load_hf_tokenizer(tok_path, trust_remote_code=trust_remote_code, name=name)
    if precision.is_fp8:
        store_linear_weights(model, precision.storage, precision.compute)
    return LoadedLLM(model=_freeze(model), tokenizer=hf_tokenizer, family=fam, name=name, precision=precision)


def _peek_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape without reading the tensors (safetensors header), for config inference."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as error:
            raise TextEncoderError(f"{path}: not a readable safetensors file ({error})") from error
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def _resolve_family(config, family: str | None, name: str) -> str:
    detected = family_of(config.model_type)
    if family is not None and family != detected:
        raise TextEncoderError(
            f"{name}: family={family!r} was asked for, but the config says model_type {config.model_type!r} "
            f"({detected})"
        )
    return detected


def read_config_json(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
