"""Model folder registration and text-encoder listing (in-process, ComfyUI's folder_paths)."""

from __future__ import annotations

import json

import pytest

from tests.nodes.inprocess import load_pack
from devtools import tiny_models as tm


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    tm.import_comfy()
    import folder_paths

    load_pack()
    import sys

    mod = sys.modules["ella_pack_under_test.nodes.folders"]
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    yield mod, folder_paths
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def test_ella_folder_keeps_yaml_paths_and_filters_extensions(folders, tmp_path):
    mod, folder_paths = folders
    extra = tmp_path / "elsewhere" / "ella"
    extra.mkdir(parents=True)
    (extra / "mine.safetensors").write_bytes(b"")
    (extra / "notes.txt").write_text("not a model")
    folder_paths.folder_names_and_paths.pop("ella", None)
    folder_paths.add_model_folder_path("ella", str(extra))  # what extra_model_paths.yaml does (no extensions)
    mod.register_folders()
    paths, exts = folder_paths.folder_names_and_paths["ella"]
    assert str(extra) in paths and any(p.endswith("models/ella") or p.endswith("models\\ella") for p in paths)
    assert exts == {".safetensors"}
    folder_paths.filename_list_cache.clear()
    assert folder_paths.get_filename_list("ella") == ["mine.safetensors"]


def test_text_encoder_listing(folders, tmp_path):
    mod, folder_paths = folders
    te, llm = tmp_path / "text_encoders", tmp_path / "LLM"
    (te / "flan-t5-xl").mkdir(parents=True)
    (te / "flan-t5-xl" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (te / "flan-t5-xl" / "model.safetensors").write_bytes(b"")
    (te / "clip_l.safetensors").write_bytes(b"")  # a ComfyUI CLIP file: no tokenizer beside it, not listed
    (te / "t5_single.safetensors").write_bytes(b"")
    (te / "t5_single_tokenizer").mkdir()
    (te / "t5_single_tokenizer" / "tokenizer.json").write_text("{}")
    (llm / "org" / "llama").mkdir(parents=True)
    (llm / "org" / "llama" / "config.json").write_text("{}")
    (llm / "smol.gguf").write_bytes(b"")
    folder_paths.folder_names_and_paths["text_encoders"] = ([str(te)], {".safetensors"})
    folder_paths.folder_names_and_paths["LLM"] = ([str(llm)], {".safetensors", ".gguf"})
    assert mod.list_text_encoders() == ["flan-t5-xl", "org/llama", "smol.gguf", "t5_single.safetensors"]
    assert mod.resolve_text_encoder("smol.gguf") == str(llm / "smol.gguf")
    assert mod.tokenizer_beside(str(te / "t5_single.safetensors")) == str(te / "t5_single_tokenizer")
    with pytest.raises(FileNotFoundError, match="missing-model"):
        mod.resolve_text_encoder("missing-model")
    with pytest.raises(FileNotFoundError):
        (tmp_path / "secret.gguf").write_bytes(b"")
        mod.resolve_text_encoder("../secret.gguf")  # no escaping the model folders
