"""Model folders: `ella` (connectors) and the LLM text encoders in `text_encoders`, `LLM` and `ella_encoder`.

Paths users add in extra_model_paths.yaml (`ella: ...`, `LLM: ...`, `ella_encoder: ...`) are kept; we only
make sure the default folder is listed and the extension filter is set (a bare `add_model_folder_path`
leaves it empty, which would list every file).

`ella_encoder` is the reference pack's (TencentQQGYLab/ComfyUI-ELLA) T5 folder: we read it, so users coming
from that pack see their T5, but never register it, so which pack is imported first changes nothing.
"""

from __future__ import annotations

import os

import folder_paths

from ..ella_core.llm_loading import is_t5_encoder_file, tokenizer_beside

ELLA_FOLDER = "ella"
ENCODER_FOLDERS = ("text_encoders", "LLM")
REFERENCE_ENCODER_FOLDER = "ella_encoder"  # searched after ENCODER_FOLDERS; registered only by the reference pack


def _register(name: str, extensions: set[str]) -> None:
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | extensions)
    else:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))


def register_folders() -> None:
    """Called once when the pack is imported; creates no folders."""
    _register(ELLA_FOLDER, {".safetensors"})
    _register("LLM", {".safetensors", ".gguf"})


def _encoder_roots() -> list[str]:
    """Folders searched for text encoders, in order: ours, then the reference pack's `ella_encoder` (its
    extra_model_paths.yaml entries, else the default `models/ella_encoder`, which nobody may have registered)."""
    roots: list[str] = []

    def add(paths) -> None:
        roots.extend(p for p in paths if p not in roots)

    for name in ENCODER_FOLDERS:
        if name in folder_paths.folder_names_and_paths:
            add(folder_paths.get_folder_paths(name))
    if REFERENCE_ENCODER_FOLDER in folder_paths.folder_names_and_paths:
        add(folder_paths.get_folder_paths(REFERENCE_ENCODER_FOLDER))
    add([os.path.join(folder_paths.models_dir, REFERENCE_ENCODER_FOLDER)])
    return roots


def list_text_encoders() -> list[str]:
    """Names (relative to their folder) of HF folders with a config.json, .gguf files, and .safetensors with a
    tokenizer folder beside them or holding a T5 encoder (ComfyUI's T5 tokenizer serves those); found in
    models/text_encoders, models/clip, models/LLM and models/ella_encoder."""
    names: list[str] = []
    for root in _encoder_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if "config.json" in filenames and depth > 0:
                names.append(rel.replace(os.sep, "/"))
                dirnames[:] = []  # a model folder's subfolders are its own business
                continue
            if depth >= 3:
                dirnames[:] = []
            for f in filenames:
                full = os.path.join(dirpath, f)
                name = os.path.relpath(full, root).replace(os.sep, "/")
                single = f.endswith(".safetensors") and (tokenizer_beside(full) or is_t5_encoder_file(full))
                if f.endswith(".gguf") or single:
                    names.append(name)
    return sorted(set(names))


def resolve_text_encoder(name: str) -> str:
    """Full path of a listed text encoder; the error names the folders searched."""
    roots = _encoder_roots()
    for root in roots:
        root = os.path.normpath(root)
        full = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, full]) != root:
            continue  # no escaping the model folders
        if os.path.exists(full):
            return full
    raise FileNotFoundError(f"ELLA text encoder '{name}' not found: put it in {where_to_put(*ENCODER_FOLDERS)}; "
                            f"models/{REFERENCE_ENCODER_FOLDER} (the reference ELLA pack's folder) is searched too")


def where_to_put(*kinds: str) -> str:
    """Where a user puts files of these model kinds, relative (never the server's absolute paths)."""
    listed = " or ".join(f"models/{kind}" for kind in kinds)
    return f"{listed} (or a folder named {' / '.join(kinds)} in extra_model_paths.yaml)"
