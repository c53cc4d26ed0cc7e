"""Builders of tiny real models for the text-encoder tests (imported by conftest and the tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch


def t5_tokenizer_source() -> Path:
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set (scripts/setup_env.sh exports it); ComfyUI's T5 tokenizer is needed")
    path = Path(comfy) / "comfy" / "text_encoders" / "t5_tokenizer"
    if not path.is_dir():
        pytest.fail(f"ComfyUI's T5 tokenizer not found at {path}")
    return path


def copy_tokenizer(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        shutil.copy(item, dst / item.name)


def tiny_t5_config(kind: str = "t5", **overrides):
    from transformers import MT5Config, T5Config, UMT5Config

    cls = {"t5": T5Config, "umt5": UMT5Config, "mt5": MT5Config}[kind]
    fields = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)  # fmt: skip
    fields.update(overrides)
    return cls(**fields)


def build_t5_folder(folder: Path, kind: str = "t5", seed: int = 0, scale: float = 1.0, qk_scale: float = 1.0,
                    **overrides) -> Path:  # fmt: skip
    from transformers import MT5EncoderModel, T5EncoderModel, UMT5EncoderModel

    cls = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel, "mt5": MT5EncoderModel}[kind]
    torch.manual_seed(seed)
    model = cls(tiny_t5_config(kind, **overrides))
    if scale != 1.0 or qk_scale != 1.0:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:
                    param.mul_(scale)
            for name, param in model.named_parameters():
                if name.endswith(("SelfAttention.q.weight", "SelfAttention.k.weight")):
                    param.mul_(qk_scale)
    model.save_pretrained(folder)
    copy_tokenizer(t5_tokenizer_source(), folder)
    return folder


WORDS = ("a photo of cat dog red blue hat on the mat in garden with sun sky tree house big small "
         "sitting running green yellow car road night day city and").split()  # fmt: skip


def build_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer that adds BOS like Llama's, and has no pad token (so pad falls back to EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)


def build_llama_folder(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    build_word_tokenizer(folder)
    return folder


def write_t5_single_file(folder: Path, path: Path, prefix: str = "") -> Path:
    """The README's fp16 recipe (`T5EncoderModel.from_pretrained(..., fp16).save_pretrained`) applied to the
    tiny T5 `folder`, keeping only its model.safetensors, as `path` (keys optionally under `prefix`, e.g.
    ComfyUI's `text_encoders.t5xxl.transformer.`). No tokenizer or config goes with it."""
    import tempfile

    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    from ella_core.llm_loading import hf_dtype_kwargs

    with tempfile.TemporaryDirectory() as tmp:
        T5EncoderModel.from_pretrained(folder, **hf_dtype_kwargs(torch.float16)).save_pretrained(tmp)
        state = load_file(os.path.join(tmp, "model.safetensors"))
    save_file({prefix + k: v for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path
