"""Queue-time checks for the loader nodes (`validate_inputs`): POST /prompt answers with a node error.

ComfyUI 0.3.75 does not check V3 combo values against their options, and a missing file would otherwise
surface only when the job runs. Each check returns True or a message naming the input, the value, and where
the file belongs (relative folders, never the server's absolute paths). Checks read file headers only.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..ella_core.checkpoint import ELLACheckpointError, read_ella_metadata
from ..ella_core.gguf_check import GGUFFileError, check_gguf_file
from ..ella_core.prompt_text import PromptTextError, check_prompt_text
from ..ella_core.prompt_weights import ATTENTION, PromptWeightError, weigh_prompt
from . import folders


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def widget_problems(node: type[io.ComfyNode], values: dict[str, object]) -> list[str]:
    """Values that break the node's own schema: a combo value not among its options, an integer that is not
    one or is outside min..max. (Naming an input in validate_inputs turns off ComfyUI's min/max check.)"""
    problems = []
    for spec in node.define_schema().inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        if isinstance(spec, io.Combo.Input) and value not in spec.options:
            problems.append(f"{spec.id} {_shown(value)} is not one of {list(spec.options)}")
        elif isinstance(spec, io.Int.Input):
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{spec.id} must be an integer, got {_shown(value)}")
            elif (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
                problems.append(f"{spec.id} must be between {spec.min} and {spec.max}, got {value}")
    return problems


def _relative(message: str, path: str, name: str) -> str:
    return message.replace(path, f"'{name}'")


def connector_problem(ella_name: object) -> str | None:
    """The connector file is listed in an `ella` folder and its header describes a valid connector."""
    if ella_name is None:
        return None
    if not isinstance(ella_name, str) or not ella_name:
        return f"ella_name must be a connector file name, got {_shown(ella_name)}"
    path = folder_paths.get_full_path(folders.ELLA_FOLDER, ella_name)
    if path is None:
        return (f"ELLA connector '{ella_name}' not found: put it in {folders.where_to_put(folders.ELLA_FOLDER)} "
                "and refresh the node list")
    try:
        read_ella_metadata(path)
    except (ELLACheckpointError, OSError) as e:
        return _relative(f"ELLA connector '{ella_name}' cannot be used: {e}", path, ella_name)
    return None


def text_encoder_problem(model_name: object) -> str | None:
    """The encoder exists in the text-encoder folders; a .gguf file is complete."""
    if model_name is None:
        return None
    if not isinstance(model_name, str) or not model_name:
        return f"model_name must be a text encoder name, got {_shown(model_name)}"
    try:
        path = folders.resolve_text_encoder(model_name)
    except FileNotFoundError as e:
        return f"{e}; then refresh the node list"
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        try:
            check_gguf_file(path)
        except (GGUFFileError, OSError) as e:
            return _relative(str(e), path, model_name)
    return None


def prompt_problem(text: object) -> str | None:
    if not isinstance(text, str):
        return None  # a linked input: checked when it arrives
    try:
        check_prompt_text(text, "text")
    except PromptTextError as e:
        return str(e)
    return None


def weights_problem(text: object, weighting: object) -> str | None:
    """With weighting "connector attention": every weight is one the connector can apply (finite, >= 0)."""
    if not isinstance(text, str) or weighting != ATTENTION:
        return None
    try:
        weigh_prompt(text)
    except (PromptWeightError, PromptTextError) as e:
        return f"text: {e}"
    return None


def verdict(*problems: str | None) -> bool | str:
    found = [p for p in problems if p]
    return "; ".join(found) if found else True
