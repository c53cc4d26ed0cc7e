"""The config is validated completely before any model loads: a table of bad values, each refused with a
message naming the key; several at once are all reported; the real script refuses them with status 2, no
traceback, no output folder and without even importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.training.train_helpers import ROOT, TINY_CONFIG, TRAIN_SCRIPT

from training.config import ConfigError, load_config

BAD = [  # (override, text the message must contain)
    ("train.keep_checkpoints=abc", "train.keep_checkpoints='abc': must be an integer"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1 must be >= 0"),
    ("optim.lr=-1", "optim.lr=-1.0 must be >= 0"),
    ("optim.lr=fast", "optim.lr='fast': must be a number"),
    ("optim.lr=.inf", "optim.lr=inf: must be a number"),
    ("optim.lr=[0.1]", "optim.lr=[0.1]: must be a number"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers"),
    ("optim.betas=[0.9, 1.5]", "optim.betas=[0.9, 1.5] must be two numbers"),
    ("optim.betas=0.9", "optim.betas=0.9: must be a list of a number"),
    ("optim.betas=[a, b]", "optim.betas=['a', 'b']: must be a list of a number"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.max_grad_norm=0", "optim.max_grad_norm=0.0 must be > 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("optim.warmup_steps=2.5", "optim.warmup_steps=2.5: must be an integer"),
    ("optim.schedule=exp", "optim.schedule='exp' is not one of"),
    ("optim.schedule_steps=0", "optim.schedule_steps=0 must be > 0"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("data.path=", "data.path is not set"),
    ("data.path=null", "data.path is not set"),
    ("data.path=/nonexistent/folder", "data.path=/nonexistent/folder: no such folder"),
    ("data.path=/nonexistent/train.jsonl", "data.path=/nonexistent/train.jsonl: no such manifest file"),
    ("data.path={a: 1}", "data.path={'a': 1}: must be a string or a list of a string"),
    ("data.buckets=maybe", "data.buckets='maybe': must be true or false"),
    ("data.buckets=1", "data.buckets=1: must be true or false"),
    ("data.resolution=40", "data.resolution=40 must be a multiple of data.bucket_step=16"),
    ("data.resolution=0", "data.resolution=0 must be > 0"),
    ("data.bucket_step=0", "data.bucket_step=0 must be > 0"),
    ("data.caption_dropout=1.0", "data.caption_dropout=1.0 must be in [0, 1)"),
    ("data.caption_dropout=-0.1", "data.caption_dropout=-0.1 must be in [0, 1)"),
    ("data.caption_columns=[]", "data.caption_columns is not set"),
    ("data.caption_columns=[caption, ' ']", "data.caption_columns=['caption', ' '] has an empty column name"),
    ("data.caption_rule=weighted", "needs data.caption_weights"),
    ("data.caption_weights=[-1, 2]", "data.caption_weights=[-1.0, 2.0] must be >= 0"),
    ("data.caption_weights=[0, 0]", "data.caption_weights=[0.0, 0.0] must be >= 0 with a positive sum"),
    ("data.max_aspect=0.5", "data.max_aspect=0.5 must be >= 1"),
    ("data.format=parquet", "data.format='parquet' is not one of"),
    ("data.image_column=", "data.image_column is not set"),
    ("llm.source=", "llm.source is not set"),
    ("llm.source=null", "llm.source is not set"),
    ("llm.source=/nonexistent/t5", "llm.source=/nonexistent/t5: no such file or folder"),
    ("llm.dtype=float8", "llm.dtype='float8' is not one of"),
    ("llm.max_length=0", "llm.max_length=0 must be > 0"),
    ("llm.hidden_layer=last", "llm.hidden_layer='last': must be an integer or null"),
    ("llm.token_mode=padded", "llm.token_mode='padded' is not one of ['fixed', 'flexible']"),
    ("model.pretrained=null", "model.pretrained is not set"),
    ("model.pretrained=/nonexistent/sd15", "model.pretrained=/nonexistent/sd15: no such file or folder"),
    ("model.base=sd3", "model.base='sd3' is not one of"),
    ("model.prediction_type=x0", "model.prediction_type='x0' is not one of"),
    ("model.vae_dtype=fp8_e4m3fn", "model.vae_dtype='fp8_e4m3fn' is not one of"),  # fp8 only stores LLM weights
    ("connector.layers=0", "connector.layers=0 must be > 0"),
    ("connector.heads=-2", "connector.heads=-2 must be > 0"),
    ("connector.time_channel=33", "connector.time_channel=33 must be even"),
    ("connector.init_from=/nonexistent.safetensors", "connector.init_from=/nonexistent.safetensors: no such file"),
    ("cache.shard_size=0", "cache.shard_size=0 must be > 0"),
    ("cache.latent_dtype=int8", "cache.latent_dtype='int8' is not one of"),
    ("cache.enabled=yes please", "cache.enabled='yes please': must be true or false"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("train.batch_size=2.5", "train.batch_size=2.5: must be an integer"),
    ("train.batch_size=true", "train.batch_size=True: must be an integer"),
    ("train.grad_accum=0", "train.grad_accum=0 must be > 0"),
    ("train.max_steps=-5", "train.max_steps=-5 must be > 0"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not one of"),
    ("train.ema_decay=1.5", "train.ema_decay=1.5 must be in (0, 1)"),
    ("train.min_snr_gamma=0", "train.min_snr_gamma=0.0 must be > 0"),
    ("train.noise_offset=-1", "train.noise_offset=-1.0 must be >= 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be > 0"),
    ("train.log_every=0", "train.log_every=0 must be > 0"),
    ("train.device=gpu0", "train.device='gpu0' is not a device"),
    ("train.backend=tcp", "train.backend='tcp' is not one of"),
    ("train.resume=/nonexistent", "train.resume=/nonexistent: not a checkpoint folder"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s=0 must be > 0"),
    ("train.compile=sometimes", "train.compile='sometimes': must be true or false"),
    ("validation.every=-1", "validation.every=-1 must be >= 0"),
    ("validation.steps=0", "validation.steps=0 must be > 0"),
    ("validation.height=100", "validation.height=100 must be a multiple of 8"),
    ("validation.prompts={a: b}", "validation.prompts={'a': 'b'}: must be a list of a string"),
    ("validation.guidance_scale=lots", "validation.guidance_scale='lots': must be a number"),
    ("train=5", "train must be a section (a mapping), got 5"),
    ("model.foo=1", "unknown config key(s) ['model.foo']"),
    ("seed=abc", "seed='abc': must be an integer"),
    ("output_dir=null", "output_dir is not set"),
    ("output_dir=[a, b]", "output_dir=['a', 'b']: must be a string"),
]


@pytest.fixture()
def valid(tmp_path, tiny_sd15, tiny_t5) -> list[str]:
    (tmp_path / "data").mkdir()
    return [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'run'}"]


def test_the_valid_base_loads(valid):
    load_config(TINY_CONFIG, valid)


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_naming_the_key(valid, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, valid + [override])
    assert message in str(info.value)


@pytest.mark.parametrize("override, attribute, value", [
    ("validation.prompts=a single prompt", ("validation", "prompts"), ["a single prompt"]),
    ("data.caption_columns=dense", ("data", "caption_columns"), ["dense"]),
    ("train.max_steps=1e4", ("train", "max_steps"), 10000),
    ("optim.lr=1e-4", ("optim", "lr"), 1e-4),
    ("optim.lr=0", ("optim", "lr"), 0.0),
    ("data.buckets=false", ("data", "buckets"), False),
    ("train.ema_decay=null", ("train", "ema_decay"), None),
    ("optim.betas=[0.8, 0.99]", ("optim", "betas"), [0.8, 0.99]),
    ("model.pretrained=org/a-hub-id", ("model", "pretrained"), "org/a-hub-id"),  # hub ids are not checked
])
def test_good_values_are_typed(valid, override, attribute, value):
    config = load_config(TINY_CONFIG, valid + [override])
    assert getattr(getattr(config, attribute[0]), attribute[1]) == value


def test_every_problem_is_reported_at_once(valid):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, valid + ["optim.lr=-1", "train.keep_checkpoints=abc", "data.buckets=maybe"])
    text = str(info.value)
    assert text.startswith("3 problems") and all(k in text for k in ("optim.lr", "keep_checkpoints", "data.buckets"))


SCRIPT_CASES = ["train.keep_checkpoints=abc", "optim.lr=-1", "optim.betas=[0.9]", "data.num_workers=-1",
                "--resume=/nonexistent", "data.path=null", "llm.source=null", "data.buckets=maybe"]


@pytest.mark.parametrize("override", SCRIPT_CASES)
def test_the_script_refuses_before_loading_anything(valid, tmp_path, override):
    args = valid + [override] if not override.startswith("--") else valid + override.split("=", 1)
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(TINY_CONFIG), *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 2, proc.stderr
    key = override.lstrip("-").split("=")[0].replace("resume", "train.resume")
    assert proc.stderr.startswith("config error: ") and key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # run() never started: it creates output_dir first


def test_refusal_happens_before_torch_is_imported(valid):
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from training.train import main
codes = [main(["--config", {str(TINY_CONFIG)!r}, *{valid!r}, o]) for o in {SCRIPT_CASES[:4]!r}]
print(json.dumps({{"codes": codes, "torch": "torch" in sys.modules, "diffusers": "diffusers" in sys.modules}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert json.loads(proc.stdout.splitlines()[-1]) == {"codes": [2, 2, 2, 2], "torch": False, "diffusers": False}


def test_the_schema_knows_the_dtypes_the_models_parse():
    """The schema's torch-free name lists equal what the one dtype table (ella_core.dtypes) accepts."""
    from ella_core.dtypes import ALIASES, AUTO, NAMES, canonical_name
    from training.config import DTYPE_NAMES, LLM_DTYPE_NAMES
    from training.models import DTYPES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)
    assert sorted(LLM_DTYPE_NAMES) == sorted({*AUTO, *NAMES, *ALIASES})
    for name in LLM_DTYPE_NAMES:
        canonical_name(name)  # every listed name parses


def test_the_schema_knows_the_connector_pools_the_core_builds():
    """training.config's torch-free pool list is ella_core's, less None (the schema's `null`)."""
    from ella_core.config import INPUT_POOLS
    from training.config import CONNECTOR_POOLS

    assert sorted(CONNECTOR_POOLS) == sorted(p for p in INPUT_POOLS if p is not None)
