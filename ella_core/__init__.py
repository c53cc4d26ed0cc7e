"""ELLA core: the Timestep-Aware Semantic Connector and the LLM text encoders that feed it.

Independent of ComfyUI, so the nodes, the trainer and outside tools share one implementation.
"""

from .checkpoint import (
    ELLACheckpointError,
    EllaMetadata,
    infer_config,
    load_ella,
    load_ella_with_metadata,
    read_ella_metadata,
    save_ella,
)
from .config import BASE_CONTEXT_WIDTH, ELLAConfig
from .connector import ELLA
from .llm_loading import TextEncoderError
from .prompt_text import strip_weight_syntax
from .text_encoder import EncodedText, LLMTextEncoder, WidthMismatchError, check_width, load_text_encoder
from .tokenization import PromptTokenizer, TokenCount, load_tokenizer

__all__ = [
    "BASE_CONTEXT_WIDTH",
    "ELLA",
    "ELLACheckpointError",
    "ELLAConfig",
    "EllaMetadata",
    "EncodedText",
    "LLMTextEncoder",
    "PromptTokenizer",
    "TextEncoderError",
    "TokenCount",
    "WidthMismatchError",
    "check_width",
    "load_text_encoder",
    "load_tokenizer",
    "strip_weight_syntax",
    "infer_config",
    "load_ella",
    "load_ella_with_metadata",
    "read_ella_metadata",
    "save_ella",
]
