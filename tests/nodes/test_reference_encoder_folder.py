"""Our text-encoder loader reads the reference pack's `models/ella_encoder` folder (in-process folder_paths).

Users coming from TencentQQGYLab/ComfyUI-ELLA keep their T5 there; we list and resolve it (default folder and
extra_model_paths.yaml entries), without registering the folder ourselves, so it makes no difference which
of the two packs ComfyUI imports first.
"""

from __future__ import annotations

import importlib
import json
import sys
from itertools import permutations

import pytest

from tests.nodes.inprocess import load_pack
from devtools import tiny_models as tm


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """(our folders module, folder_paths, register the stand-in reference's folders) on a fresh models dir."""
    tm.import_comfy()
    import folder_paths

    load_pack()
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    standin = importlib.import_module("tests.support.reference_pack_standin")  # registers on import: reset below
    models = tmp_path / "models"
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    for name in ("ella", "ella_encoder", "LLM", "text_encoders"):
        folder_paths.folder_names_and_paths.pop(name, None)
    folder_paths.folder_names_and_paths["text_encoders"] = ([str(models / "text_encoders")], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    yield sys.modules["ella_pack_under_test.nodes.folders"], folder_paths, standin._register_folders, models
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def _hf_folder(path, model_type="t5"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def test_default_ella_encoder_folder_is_listed_and_resolved_without_registering_it(env):
    mod, folder_paths, _, models = env
    t5 = _hf_folder(models / "ella_encoder" / "flan-t5-xl")
    nested = _hf_folder(models / "ella_encoder" / "google" / "t5-v1_1-xl")
    mod.register_folders()
    assert "ella_encoder" not in folder_paths.folder_names_and_paths
    assert mod.list_text_encoders() == ["flan-t5-xl", "google/t5-v1_1-xl"]
    assert mod.resolve_text_encoder("flan-t5-xl") == str(t5)
    assert mod.resolve_text_encoder("google/t5-v1_1-xl") == str(nested)
    with pytest.raises(FileNotFoundError, match="ella_encoder"):  # the error names the folders searched
        mod.resolve_text_encoder("flan-t5-xxl")


def test_yaml_paths_of_ella_encoder_are_honoured_and_text_encoders_win_a_name_clash(env, tmp_path):
    mod, folder_paths, _, models = env
    elsewhere = tmp_path / "nas" / "ella_encoder"
    mine = _hf_folder(elsewhere / "my-t5")
    both_ref = _hf_folder(models / "ella_encoder" / "flan-t5-xl")
    both_ours = _hf_folder(models / "text_encoders" / "flan-t5-xl")
    folder_paths.add_model_folder_path("ella_encoder", str(elsewhere))  # what extra_model_paths.yaml does
    mod.register_folders()
    assert mod.list_text_encoders() == ["flan-t5-xl", "my-t5"]
    assert mod.resolve_text_encoder("my-t5") == str(mine)
    assert mod.resolve_text_encoder("flan-t5-xl") == str(both_ours) != str(both_ref)


@pytest.mark.parametrize("order", list(permutations(["ours", "reference"])))
@pytest.mark.parametrize("yaml", [False, True])
def test_import_order_of_the_two_packs_changes_nothing(env, tmp_path, order, yaml):
    """Both packs register `ella`; the reference also `ella_encoder`. Listings agree in every order."""
    mod, folder_paths, register_reference, models = env
    connector = models / "ella" / "ella-sd1.5-tsc-t5xl.safetensors"
    connector.parent.mkdir(parents=True)
    connector.write_bytes(b"")
    (models / "ella" / "README.txt").write_text("not a model")
    _hf_folder(models / "ella_encoder" / "flan-t5-xl")
    extra = tmp_path / "yaml" / "ella"
    if yaml:
        _hf_folder(tmp_path / "yaml" / "ella_encoder" / "t5-from-yaml")
        (extra).mkdir(parents=True)
        (extra / "trained.safetensors").write_bytes(b"")
        folder_paths.add_model_folder_path("ella", str(extra))
        folder_paths.add_model_folder_path("ella_encoder", str(tmp_path / "yaml" / "ella_encoder"))
    for pack in order:
        (mod.register_folders if pack == "ours" else register_reference)()
    folder_paths.filename_list_cache.clear()
    expected_connectors = ["ella-sd1.5-tsc-t5xl.safetensors"] + (["trained.safetensors"] if yaml else [])
    assert sorted(folder_paths.get_filename_list("ella")) == expected_connectors
    assert mod.list_text_encoders() == ["flan-t5-xl"] + (["t5-from-yaml"] if yaml else [])
    # The reference keeps a yaml path and then drops its default folder; we still list both.
    assert (str(tmp_path / "yaml" / "ella_encoder") in folder_paths.get_folder_paths("ella_encoder")) == yaml
