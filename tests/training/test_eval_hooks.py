"""validation.hooks (training/hooks.py): specs resolved by the config check, called on rank 0 only, with the
EMA weights in eval mode (training weights and mode untouched), their numbers logged as returned (NaN
included), and a failing or malformed hook failing with its name. The hooks inside real runs:
tests/training/test_ablation_options.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ella_core import ELLA, ELLAConfig
from training.config import ConfigError, Config, load_config
from training.distributed import Dist
from training.hooks import Hook, HookError, call_hooks, due, resolve
from training.models import EMA

TINY = ELLAConfig(input_dim=8, width=16, layers=1, heads=2, num_latents=4, time_channel=8, time_embed_dim=8)
REQUIRED = ["model.pretrained=some/model", "llm.source=some/llm"]


def _config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [*REQUIRED, f"data.path={tmp_path}", *overrides])


def _hook_file(tmp_path: Path, body: str, name: str = "my_hooks.py") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


# ---------------------------------------------------------------- specs
def test_module_and_file_specs_resolve(tmp_path, monkeypatch):
    _hook_file(tmp_path, "def score(ctx):\n    return {'x': 1.0}\n")
    monkeypatch.chdir(tmp_path)  # a relative file path is relative to the current directory
    for spec in ("my_hooks.py:score", f"{tmp_path}/my_hooks.py:score", "tests.training.eval_hook_probe:probe"):
        hook = resolve(spec)
        assert callable(hook.function) and hook.spec == spec
    assert resolve("my_hooks.py:score").name == "score"
    assert resolve("my_hooks.py:score").function is resolve(f"{tmp_path}/my_hooks.py:score").function  # imported once
    config = _config(tmp_path, "validation.hooks=[my_hooks.py:score, tests.training.eval_hook_probe:probe]")
    assert config.validation.hooks == ["my_hooks.py:score", "tests.training.eval_hook_probe:probe"]


@pytest.mark.parametrize("spec, message", [
    ("score", r"'score' is not 'package\.module:function' or 'path/to/file\.py:function'"),
    ("a:b:c", r"'a:b:c' is not 'package\.module:function'"),
    ("nosuch_package.mod:f", r"'nosuch_package\.mod:f': no module 'nosuch_package' on the Python path"),
    ("missing.py:f", r"'missing\.py:f': no such Python file .*missing\.py"),
    ("hooks_a.py:absent", r"'hooks_a\.py:absent': hooks_a\.py has no function 'absent' \(it has \['score'\]\)"),
    ("hooks_a.py:VALUE", r"hooks_a\.py\.VALUE is a int, not a function"),
    ("hooks_b.py:f", r"'hooks_b\.py:f': importing .*hooks_b\.py failed: ZeroDivisionError"),
    ("[hooks_a.py:score, hooks_c.py:score]", r"\['hooks_a\.py:score', 'hooks_c\.py:score'\] are all named 'score'"),
])
def test_bad_specs_are_config_errors_naming_the_hook(tmp_path, monkeypatch, spec, message):
    _hook_file(tmp_path, "VALUE = 3\ndef score(ctx):\n    return None\n", "hooks_a.py")
    _hook_file(tmp_path, "1 / 0\n", "hooks_b.py")
    _hook_file(tmp_path, "def score(ctx):\n    return None\n", "hooks_c.py")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, f"validation.hooks={spec}")


@pytest.mark.parametrize("every, total, calls", [
    (0, 5, [5]),  # no validations: after the last step only
    (2, 5, [2, 4, 5]),
    (2, 4, [2, 4]),  # the last step is a validation step: called once
    (10, 4, [4]),
])
def test_hooks_are_due_at_every_validation_and_after_the_last_step(every, total, calls):
    hooks = [Hook("m:f", "f", lambda ctx: None)]
    assert [s for s in range(1, total + 1) if due(hooks, s, total, every)] == calls
    assert not any(due([], s, total, every) for s in range(1, total + 1))


# ---------------------------------------------------------------- calls
class Reporter:
    def __init__(self) -> None:
        self.values: list[tuple[dict, int]] = []

    def scalars(self, values: dict, step: int) -> None:
        self.values.append((values, step))


def _call(hooks, ella, ema=None, rank=0, step=3, total=3, tmp_path=Path(".")):
    written, reporter = [], Reporter()
    records = call_hooks(hooks, step=step, total=total, ella=ella, ema=ema, base=None,
                         data=SimpleNamespace(empty=torch.zeros(2, 8), llm=None), config=Config(),
                         dist=Dist(rank=rank), out=tmp_path, write=written.append, reporter=reporter)
    return records, written, reporter.values


def _connector() -> ELLA:
    torch.manual_seed(0)
    return ELLA(TINY).train()


def test_only_rank_zero_calls_hooks():
    calls = []
    hooks = [Hook("m:f", "f", lambda ctx: calls.append(ctx.step) or {"a": 1.0})]
    assert _call(hooks, _connector(), rank=1) == ([], [], [])
    assert calls == []
    _call(hooks, _connector(), rank=0)
    assert calls == [3]


@pytest.mark.parametrize("with_ema", [True, False])
def test_the_hook_sees_the_ema_weights_in_eval_mode_and_training_is_untouched(with_ema):
    ella = _connector()
    before = {k: v.clone() for k, v in ella.state_dict().items()}
    ema = None
    if with_ema:
        ema = EMA(ella, 0.99)
        ema.shadow = {k: v + 1.0 for k, v in ema.shadow.items()}  # EMA weights that differ from the training ones
    seen = {}

    def look(ctx):
        seen.update(training=ctx.connector.training, grad=torch.is_grad_enabled(), final=ctx.final,
                    state={k: v.clone() for k, v in ctx.connector.state_dict().items()})
        return {"n": 1}

    _call([Hook("m:look", "look", look)], ella, ema)
    assert seen["training"] is False and seen["grad"] is False and seen["final"] is True
    expected = ema.shadow if with_ema else before
    assert all(torch.equal(seen["state"][k], expected[k]) for k in before)
    assert ella.training  # mode restored
    assert all(torch.equal(ella.state_dict()[k], before[k]) for k in before)


def test_metrics_go_to_the_record_and_the_reporter_as_returned():
    hooks = [Hook("m:a", "a", lambda ctx: {"acc": 0.5, "count": 3, "flag": True, "t": torch.tensor(2.5),
                                          "nan": math.nan, "inf": -math.inf}),
             Hook("m:b", "b", lambda ctx: None)]
    records, written, reported = _call(hooks, _connector(), step=7, total=9)
    assert written == records and len(records) == 1  # None logs nothing
    record = records[0]
    assert {k: record[k] for k in ("step", "hook", "acc", "count", "flag", "t")} == {
        "step": 7, "hook": "a", "acc": 0.5, "count": 3.0, "flag": 1.0, "t": 2.5}
    assert math.isnan(record["nan"]) and record["inf"] == -math.inf
    values, step = reported[0]
    assert step == 7 and set(values) == {f"eval/a/{k}" for k in ("acc", "count", "flag", "t", "nan", "inf")}
    assert values["eval/a/acc"] == 0.5 and math.isnan(values["eval/a/nan"])


@pytest.mark.parametrize("result, message", [
    ([0.5], r"'bad' \(m:bad\) returned a list; return a dict"),
    ({"acc": "high"}, r"'bad' \(m:bad\) returned acc='high', which is not a number"),
    ({"acc": [1, 2]}, r"returned acc=\[1, 2\], which is not a number"),
    ({"step": 1.0}, r"returned the metric name 'step'"),
    ({3: 1.0}, r"returned the metric name 3"),
])
def test_malformed_results_fail_naming_the_hook(result, message):
    with pytest.raises(HookError, match=message):
        _call([Hook("m:bad", "bad", lambda ctx: result)], _connector())


def test_a_raising_hook_fails_the_run_naming_it():
    ella = _connector()

    def broken(ctx):
        raise KeyError("judge.safetensors")

    with pytest.raises(HookError, match=r"evaluation hook 'broken' \(pkg.mod:broken\) failed at step 3: "
                                        r"KeyError: 'judge.safetensors'") as info:
        _call([Hook("pkg.mod:broken", "broken", broken)], ella)
    assert isinstance(info.value.__cause__, KeyError) and ella.training
    from training.errors import TrainingError

    assert isinstance(info.value, TrainingError)  # train.py prints it and exits 1, without a traceback
