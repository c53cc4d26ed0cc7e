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

__all__ = [
    "BASE_CONTEXT_WIDTH",
    "ELLA",
    "ELLACheckpointError",
    "ELLAConfig",
    "EllaMetadata",
    "infer_config",
    "load_ella",
    "load_ella_with_metadata",
    "read_ella_metadata",
    "save_ella",
]
