"""The connector file configures the encoding (issue 8 point 9): a connector whose metadata records a hidden
layer, token length and mode gets features made that way in ELLA Prompt Encode, whatever the text encoder
loader says; the server log names both values. The file carries the trainer's own metadata
(training.loop.connector_metadata for `llm.hidden_layer=-2 llm.max_length=8`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ella_core import ELLA, ELLAConfig, EllaMetadata, load_ella, save_ella
from ella_core.encoding_settings import EncodingSettings, settings_for_connector
from ella_core.text_encoder import load_text_encoder
from tests.nodes.graphs import assert_contexts_exact, connector_reference, ella_prompt, read_calls
from devtools import tiny_models as tm

TRAINED = "trained_layer-2_len8.safetensors"


def trainer_metadata(*overrides: str) -> dict:
    """The metadata the trainer writes for a run with these overrides (its config validated as for a real run)."""
    import tempfile

    from training.config import load_config
    from training.loop import connector_metadata
    from tests.training.train_helpers import TINY_CONFIG

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "captions.jsonl"
        manifest.write_text('{"image": "a.png", "caption": "a cat"}\n')
        config = load_config(TINY_CONFIG, [f"llm.source={tm.T5_NAME}", f"data.path={manifest}",
                                           f"model.pretrained={tmp}", f"output_dir={Path(tmp) / 'run'}", *overrides])
    return connector_metadata(config, SimpleNamespace(kind="sd15", prediction_type="epsilon"), step=5)


@pytest.fixture(scope="module")
def trained_connector(tiny_base):
    path = tiny_base / "models" / "ella" / TRAINED
    config = ELLAConfig(input_dim=tm.T5_HIDDEN, width=768, layers=1, heads=8, num_latents=8, time_channel=32,
                        time_embed_dim=64)
    torch.manual_seed(11)
    module = ELLA(config)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    save_ella(module, path, trainer_metadata("llm.hidden_layer=-2", "llm.max_length=8", "llm.token_mode=fixed"))
    return path


def test_rule_recorded_values_win_inferred_do_not():
    loader = EncodingSettings("fixed", 16, None)
    recorded = EllaMetadata(token_mode="fixed", token_length=8, llm_hidden_layer=-2)
    settings, notes = settings_for_connector(recorded, loader, "connector 'c'", "text encoder 't'")
    assert settings == EncodingSettings("fixed", 8, -2) and len(notes) == 2
    assert "max_length=8" in notes[0] and "max_length=16" in notes[0] and "hidden_layer=last" in notes[1]
    guessed = EllaMetadata(token_mode="fixed", token_length=128, inferred=("token_mode", "token_length"))
    assert settings_for_connector(guessed, loader) == (loader, [])  # released file: the user's choice stands
    flexible = EllaMetadata(token_mode="flexible", token_length=8)
    settings, notes = settings_for_connector(flexible, loader)
    assert settings == EncodingSettings("flexible", 16, None) and len(notes) == 1  # no length note for flexible
    assert settings_for_connector(EllaMetadata(), loader) == (loader, [])


def test_trainer_metadata_round_trips(trained_connector):
    from ella_core import read_ella_metadata

    meta = read_ella_metadata(trained_connector)
    assert (meta.llm_hidden_layer, meta.token_length, meta.token_mode) == (-2, 8, "fixed")
    assert meta.inferred == ()


def test_encode_uses_the_connectors_settings(server, tiny_base, trained_connector, tmp_path):
    models = tiny_base / "models"
    t5 = str(models / "text_encoders" / tm.T5_NAME)
    connector = load_ella(trained_connector, dtype=torch.float32)
    as_trained = load_text_encoder(t5, dtype="fp32", device="cpu", hidden_layer=-2)
    loader_default = load_text_encoder(t5, dtype="fp32", device="cpu")
    prompt = "a red fox in the snow"
    features = as_trained.encode([prompt], mode="fixed", max_length=8).features  # (1, 8, D)
    wrong = loader_default.encode([prompt], mode="fixed", max_length=16).features
    assert features.shape[1] == 8 and wrong.shape[1] == 16
    # the graph's loader asks for 16 tokens of the last layer
    server.run(ella_prompt(out_dir=str(tmp_path / "rec"), positive=prompt, negative=prompt, ella=TRAINED, steps=2))
    calls = read_calls(tmp_path / "rec")
    ref = connector_reference(connector, features)
    assert assert_contexts_exact(calls, lambda which, t: ref(t)) == 2 * len(calls)
    other = connector_reference(connector, wrong)
    t = calls[0]["t"][:1]
    assert (other(t) - ref(t)).abs().max() > 1e-3  # the check can tell the two encodings apart
    log = server.log_tail(20000)
    assert f"ELLA connector '{TRAINED}' was trained with max_length=8" in log and "max_length=16" in log
    assert "hidden_layer=-2" in log


def test_hidden_layer_out_of_range_is_a_clear_error(server, tiny_base, tmp_path):
    from tests.support.comfy_server import PromptFailed

    path = tiny_base / "models" / "ella" / "trained_layer-9.safetensors"
    torch.manual_seed(12)
    save_ella(ELLA(ELLAConfig(input_dim=tm.T5_HIDDEN, width=768, layers=1, heads=8, num_latents=8,
                              time_channel=32, time_embed_dim=64)), path, trainer_metadata("llm.hidden_layer=-9", "llm.max_length=16"))
    with pytest.raises(PromptFailed, match="hidden_layer -9 is out of range; this model has 2 layers"):
        server.run(ella_prompt(out_dir=str(tmp_path / "rec"), ella=path.name, steps=1))
    assert server.alive()
