"""The real SmolLM2-135M-Instruct (GGUF, hidden 576): real LLM features into a real connector."""

from __future__ import annotations

import pytest
import torch

from ella_core.text_encoder import WidthMismatchError, check_width

PROMPTS = ["a photo of a red fox sitting in fresh snow", "an oil painting of a lighthouse during a storm"]


def test_gguf_loads_as_decoder(smollm2, smollm2_path):
    from transformers import AutoTokenizer

    assert smollm2.family == "decoder" and smollm2.hidden_size == 576 and smollm2.num_layers == 30
    assert smollm2.model.__class__.__name__ == "LlamaModel"  # base model, no LM head
    reference = AutoTokenizer.from_pretrained(smollm2_path.rsplit("/", 1)[0], gguf_file=smollm2_path)
    ids, count = smollm2.tokenizer.tokenize("a (red fox:1.3) in snow")
    assert ids == reference("a red fox in snow").input_ids and count.total == len(ids)
    assert smollm2.tokenizer.tokenize("")[0] == [reference.bos_token_id or reference.eos_token_id]


def test_features_match_transformers(smollm2):
    enc = smollm2.encode(PROMPTS, max_length=32)
    assert enc.features.shape == (2, 32, 576) and torch.isfinite(enc.features).all()
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([smollm2.tokenizer.tokenize(prompt)[0]])
        with torch.no_grad():
            ref = smollm2.model(input_ids=ids, use_cache=False).last_hidden_state.float()
        n = ids.shape[1]
        assert enc.token_counts[i] == n
        # right padding + mask leaves the real tokens' causal features unchanged
        torch.testing.assert_close(enc.features[i : i + 1, :n], ref, rtol=1e-4, atol=1e-4)
        flexible = smollm2.encode(prompt, mode="flexible").features
        torch.testing.assert_close(flexible, ref, rtol=1e-4, atol=1e-4)


def test_real_features_through_connector(smollm2):
    from ella_core.config import ELLAConfig
    from ella_core.connector import ELLA

    torch.manual_seed(0)
    ella = ELLA(ELLAConfig(input_dim=576, width=64, layers=2, heads=4, num_latents=8, time_embed_dim=64)).eval()
    with torch.no_grad():  # the AdaLN linears start at zero; give them weights so time and text both matter
        for param in ella.parameters():
            param.add_(0.02 * torch.randn_like(param))
    check_width(smollm2.hidden_size, ella.config.input_dim, "SmolLM2", "tiny-ella")
    features = smollm2.encode(PROMPTS + [""]).features  # fixed mode: (3, 128, 576)
    with torch.no_grad():
        context = ella(features, torch.tensor([999.0, 999.0, 999.0]))
    assert context.shape == (3, 8, 64) and torch.isfinite(context).all()
    assert (context[0] - context[1]).abs().max() > 1e-3  # the prompt changes the context
    assert (context[0] - context[2]).abs().max() > 1e-3
    with pytest.raises(WidthMismatchError, match="LLM SmolLM2 outputs width 576 but connector ella-sd15 expects input_dim 2048"):
        check_width(smollm2.hidden_size, 2048, "SmolLM2", "ella-sd15")


def test_tokenizer_only_count(smollm2, smollm2_path):
    from ella_core.tokenization import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    long = " ".join(["a beautiful landscape with mountains"] * 40)
    count = tok.count_tokens(long, max_length=128)
    assert count == smollm2.count_tokens(long, max_length=128)
    assert count.kept == 128 and count.dropped == count.total - 128 and long.endswith(count.dropped_text)
