"""The connector's ablations: `time_aware=False` (constant t) and `input_pool="mean"` (one pooled token).

Both keep the default connector's parameters, so each variant is compared with a default connector holding
the same weights: bit for bit where the computation is the same, against float64 formulas where it is not.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from ella_core import ELLA, ELLAConfig, load_ella, load_ella_with_metadata, read_ella_metadata, save_ella
from ella_core.checkpoint import FORMAT, FORMAT_VERSION, ELLACheckpointError
from ella_core.connector import pool_tokens

# num_latents 8 runs forward_many row by row, 16 stacks the rows (connector.STACK_MIN_ROWS): both paths.
SMALL = dict(input_dim=40, width=48, layers=2, heads=4, num_latents=8, time_channel=32, time_embed_dim=64)
STACKED = {**SMALL, "num_latents": 16}
ORIGINAL_FIELDS = ("input_dim", "width", "layers", "heads", "num_latents", "time_channel", "time_embed_dim",
                   "pooled_dim")


def _pair(fields: dict, seed: int, **variant) -> tuple[ELLA, ELLA]:
    """A default connector with random weights everywhere (AdaLN starts at zero) and the variant holding them."""
    torch.manual_seed(seed)
    reference = ELLA(ELLAConfig(**fields)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other = ELLA(ELLAConfig(**fields, **variant)).eval()
    other.load_state_dict(reference.state_dict(), strict=True)
    return reference, other


def _padded(g: torch.Generator, dim: int, fill: float) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """2-4 prompts of 1-11 tokens, padded with `fill` to the longest, and the -inf padding bias."""
    lengths = torch.randint(1, 12, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
    longest = max(lengths)
    prompts = [torch.randn(1, n, dim, generator=g) for n in lengths]
    padded = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, longest - p.shape[1]), value=fill) for p in prompts])
    bias = torch.zeros(len(lengths), longest)
    for i, n in enumerate(lengths):
        bias[i, n:] = -math.inf
    return prompts, padded, bias


# --- time_aware=False -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [SMALL, STACKED], ids=["row_by_row", "stacked"])
@pytest.mark.parametrize("seed", range(4))
@torch.no_grad()
def test_constant_t_is_the_time_aware_connector_at_zero(fields, seed):
    """Any t, every entry point, with and without a bias: exactly the time-aware connector at t = 0."""
    reference, constant = _pair(fields, seed, time_aware=False)
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 5
    x = torch.randn(B, L, fields["input_dim"], generator=g)
    t = torch.rand(B, generator=g) * 999  # distinct t per row
    zeros = torch.zeros(B)
    bias = torch.randn(B, L, generator=g).clamp(max=1.0)
    bias[0, 3:] = -math.inf
    for b in (None, bias):
        want = reference(x, zeros, text_bias=b)
        assert torch.equal(constant(x, t, text_bias=b), want)
        assert torch.equal(constant(x, float(t[0]), text_bias=b), want)  # one t for the batch
        projected = constant.project_text(x)
        assert torch.equal(constant.forward_projected(projected, t, text_bias=b), want)
        assert torch.equal(constant.forward_many(projected, t, text_bias=b),
                           reference.forward_many(projected, zeros, text_bias=b))
    # The ablation is real: the time-aware connector does depend on t, the constant one does not.
    assert (reference(x, t) - reference(x, zeros)).abs().max() > 1e-4
    assert torch.equal(constant(x, 999.0), constant(x, 0.0))


def test_constant_t_still_checks_the_timestep_count():
    _, constant = _pair(SMALL, 0, time_aware=False)
    x = torch.randn(2, 3, SMALL["input_dim"])
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        constant(x, torch.zeros(3))
    with pytest.raises(ValueError, match="3 timesteps for 2 rows"):
        constant.forward_many(constant.project_text(x), torch.zeros(3))


def test_constant_t_trains_the_same_parameters():
    """Gradients still reach every parameter (the AdaLN and time MLP become learned constants)."""
    _, constant = _pair(SMALL, 0, time_aware=False)
    constant.train()
    constant(torch.randn(2, 4, SMALL["input_dim"]), torch.tensor([3.0, 800.0])).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in constant.parameters())


# --- input_pool="mean" ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_pool_tokens_is_the_softmax_weighted_mean(seed):
    """Against the float64 formula sum(exp(b) x) / sum(exp(b)), with -inf tokens, log-weights and None."""
    g = torch.Generator().manual_seed(seed)
    B, L, W = 3, int(torch.randint(1, 9, (1,), generator=g)), 6
    x = torch.randn(B, L, W, generator=g)
    bias = torch.randn(B, L, generator=g)
    bias[0, 1:] = -math.inf  # one token left
    if L > 2:
        bias[1, : L // 2] = -math.inf
    for b in (None, bias):
        weights = torch.ones(B, L, dtype=torch.float64) if b is None else b.double().exp()
        want = (weights[..., None] * x.double()).sum(1, keepdim=True) / weights.sum(1)[:, None, None]
        torch.testing.assert_close(pool_tokens(x, b).double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@torch.no_grad()
def test_pool_weight_two_equals_the_token_twice(seed):
    """log(2) on a token gives it the share of two copies of it (prompt weights scale a token's share)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 5, 8, generator=g)
    j = int(torch.randint(0, 5, (1,), generator=g))
    bias = torch.zeros(1, 5)
    bias[0, j] = math.log(2.0)
    doubled = torch.cat([x, x[:, j:j + 1]], dim=1)
    torch.testing.assert_close(pool_tokens(x, bias), pool_tokens(doubled, None), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fields", [SMALL, STACKED], ids=["row_by_row", "stacked"])
@pytest.mark.parametrize("seed", range(4))
@torch.no_grad()
def test_pooled_connector_reads_one_mean_token(fields, seed):
    """The pooled connector equals the default one given the (weighted) mean feature as a one-token prompt."""
    reference, pooled = _pair(fields, seed, input_pool="mean")
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 6, fields["input_dim"], generator=g), torch.tensor([5.0, 640.0])
    bias = torch.randn(2, 6, generator=g)
    bias[1, 4:] = -math.inf
    for b in (None, bias):
        w = torch.ones(2, 6) if b is None else b.exp()
        mean = (w[..., None] * x).sum(1, keepdim=True) / w.sum(1)[:, None, None]
        torch.testing.assert_close(pooled(x, t, text_bias=b), reference(mean, t), atol=2e-5, rtol=1e-4)
    assert (pooled(x, t) - reference(x, t)).abs().max() > 1e-4  # the ablation is real


@pytest.mark.parametrize("fields", [SMALL, STACKED], ids=["row_by_row", "stacked"])
@pytest.mark.parametrize("seed", range(6))
@torch.no_grad()
def test_pooled_padded_batch_equals_each_prompt_unpadded(fields, seed):
    """Flexible mode: -inf padding is excluded exactly; every entry point gives each prompt's own context."""
    _, pooled = _pair(fields, seed, input_pool="mean")
    g = torch.Generator().manual_seed(100 + seed)
    prompts, padded, bias = _padded(g, fields["input_dim"], fill=float(seed + 1))
    t = torch.rand(len(prompts), generator=g) * 999
    projected = pooled.project_text(padded)
    tokens = pool_tokens(projected, bias)
    batched, many = pooled(padded, t, text_bias=bias), pooled.forward_many(projected, t, text_bias=bias)
    for i, p in enumerate(prompts):
        n = p.shape[1]  # the padding's own values never reach the pooled token: exact
        assert torch.equal(tokens[i:i + 1], pool_tokens(projected[i:i + 1, :n], None))
        alone = pooled(p, t[i:i + 1])
        assert torch.equal(many[i:i + 1], pooled.forward_many(projected[i:i + 1, :n], t[i:i + 1]))
        # A batch of B rows may round the resampler's products differently from one row (the BLAS, as with
        # the default connector's padded batches): to rounding, while the pooled tokens above are exact.
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(many[i:i + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad, message", [
    ("all", "leaves out all 4 tokens of row 1"),
    ("nan", "row 0 holds NaN"),
])
def test_pool_refuses_a_bias_with_nothing_to_pool(bad, message):
    _, pooled = _pair(SMALL, 0, input_pool="mean")
    bias = torch.zeros(2, 4)
    if bad == "all":
        bias[1] = -math.inf
    else:
        bias[0, 2] = math.nan
    with pytest.raises(ValueError, match=message):
        pooled(torch.randn(2, 4, SMALL["input_dim"]), 1.0, text_bias=bias)


@torch.no_grad()
def test_both_ablations_together():
    """Constant t and one pooled token compose: the pooled connector at t = 0, for any t."""
    _, pooled = _pair(SMALL, 3, input_pool="mean")
    _, both = _pair(SMALL, 3, input_pool="mean", time_aware=False)
    x = torch.randn(2, 5, SMALL["input_dim"])
    assert torch.equal(both(x, torch.tensor([7.0, 900.0])), pooled(x, torch.zeros(2)))


# --- config, files, back-compat --------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"input_pool": "max"}, r"input_pool must be one of \[None, 'mean'\].*'max'"),
    ({"input_pool": "Mean"}, r"input_pool must be one of \[None, 'mean'\].*'Mean'"),
    ({"time_aware": "no"}, "time_aware must be true or false, got 'no'"),
    ({"time_aware": 0}, "time_aware must be true or false, got 0"),
])
def test_unknown_values_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ELLAConfig(**fields)
    with pytest.raises(ValueError, match=message):
        ELLAConfig.from_dict(fields)


@pytest.mark.parametrize("variant", [{}, {"time_aware": False}, {"input_pool": "mean"},
                                     {"time_aware": False, "input_pool": "mean"}])
def test_variants_share_the_default_layout(variant):
    default = {k: tuple(v.shape) for k, v in ELLA(ELLAConfig(**SMALL)).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ELLA(ELLAConfig(**SMALL, **variant)).state_dict().items()} == default
    config = ELLAConfig(**SMALL, **variant)
    assert ELLAConfig.from_dict(json.loads(config.to_json())) == config
    assert set(config.to_dict()) == set(ORIGINAL_FIELDS) | set(variant)  # defaults are not written


def test_default_file_is_identical_to_the_original_format(tmp_path):
    """A default connector's file is exactly what the writer produced before the ablation fields existed."""
    model = ELLA(ELLAConfig(**SMALL))
    save_ella(model, tmp_path / "new.safetensors", {"base_model": "sd15", "token_length": 16})
    config = {name: getattr(model.config, name) for name in ORIGINAL_FIELDS}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"format": FORMAT, "format_version": FORMAT_VERSION,
                        "ella_config": json.dumps(config, sort_keys=True),
                        "ella_base_model": "sd15", "ella_token_length": "16"})
    new, old = (_header_and_data(tmp_path / name) for name in ("new.safetensors", "old.safetensors"))
    assert new == old


def _header_and_data(path) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON, tensor bytes). safetensors writes the metadata keys in hash order,
    which changes from one process to the next, so the header is compared as JSON and the rest byte for byte."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


@pytest.mark.parametrize("variant", [{"time_aware": False}, {"input_pool": "mean"},
                                     {"time_aware": False, "input_pool": "mean"}])
@torch.no_grad()
def test_variant_files_load_with_their_setting(tmp_path, variant):
    _, model = _pair(SMALL, 1, **variant)
    path = tmp_path / "variant.safetensors"
    save_ella(model, path, {"base_model": "sd15"})
    loaded, meta = load_ella_with_metadata(path)
    assert loaded.config == model.config == meta.config == read_ella_metadata(path).config
    x, t = torch.randn(2, 5, SMALL["input_dim"]), torch.tensor([1.0, 500.0])
    assert torch.equal(loaded(x, t), model(x, t))
    # The weights alone load into a default connector and back (init_from works both ways).
    assert torch.equal(load_ella(loaded.state_dict()).connector.latents, model.connector.latents)


def test_unknown_pool_in_a_file_names_key_field_and_values(tmp_path):
    model = ELLA(ELLAConfig(**SMALL))
    config = {**{name: getattr(model.config, name) for name in ORIGINAL_FIELDS}, "input_pool": "max"}
    path = tmp_path / "bad.safetensors"
    save_file(dict(model.state_dict()), str(path), metadata={"ella_config": json.dumps(config)})
    for read in (load_ella, read_ella_metadata):
        with pytest.raises(ELLACheckpointError, match=r"ella_config.*input_pool must be one of \[None, 'mean'\]"
                                                      r".*'max'"):
            read(path)
