"""ComfyUI nodes of the ELLA pack (thin: the logic lives in ella_core and nodes/hook.py)."""

from .ella_nodes import NODES
from .folders import register_folders

__all__ = ["NODES", "register_folders"]
