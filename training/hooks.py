"""Evaluation hooks (`validation.hooks`): the user's functions, called on rank 0 at every validation and after
the last step with an `EvalContext`; the numbers they return go to metrics.jsonl and report_to.

A spec is "package.module:function" (imported from sys.path: the repository root, plus PYTHONPATH) or
"path/to/file.py:function" (relative to the current directory). Specs are resolved (imported) when the config
is validated, so a typo fails as a config error before any model loads. A hook that raises fails the run,
naming the hook, after the step's checkpoint is saved: an evaluation that broke must not leave a benchmark
going on without its numbers. Non-finite values are logged as they are (NaN, Infinity), with a warning.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from .errors import TrainingError

if TYPE_CHECKING:  # config validation imports this module before torch
    import torch

    from ella_core import ELLA

    from .config import Config
    from .data import Data
    from .distributed import Dist
    from .models import Base

log = logging.getLogger("training")
SPEC = re.compile(r"^(?P<target>[^:]+(?::[\\/][^:]*)?):(?P<function>[A-Za-z_]\w*)$")  # C:\x.py:f keeps its drive
RESERVED = ("step", "hook")  # keys of the metrics record itself
_FILE_MODULES: dict[Path, ModuleType] = {}


class HookError(TrainingError):
    """A hook spec that cannot be resolved, or a hook that failed or returned something unusable."""


@dataclass(frozen=True)
class Hook:
    spec: str
    name: str  # the function's name: metrics.jsonl {"hook": name}, report_to eval/<name>/<metric>
    function: Callable[["EvalContext"], Optional[Mapping[str, float]]]


@dataclass
class EvalContext:
    """What a hook gets. The connector is in eval mode, with the EMA weights when train.ema_decay is set (a
    copy: the training weights are never touched); hooks run under torch.no_grad()."""

    step: int  # optimizer steps done
    final: bool  # True for the call after the last step
    output_dir: Path
    connector: "ELLA"
    base: "Base"  # the frozen UNet, VAE and scheduler (training.models.Base)
    device: "torch.device"
    config: "Config"
    _data: "Data" = field(repr=False)
    _llm: dict = field(default_factory=dict, repr=False)  # shared by the run's contexts: the LLM loads once

    @property
    def empty_features(self) -> "torch.Tensor":
        """(L, D): the empty prompt's features, the unconditional input the connector was trained with."""
        return self._data.empty

    def encode(self, texts: Sequence[str]) -> list["torch.Tensor"]:
        """Prompts -> one tensor (L_i, D) each, encoded as the trainer encodes captions (llm.* settings); the
        LLM is loaded on the first call when the run has none resident (cache.mode=full)."""
        from . import features as llm_features
        from .models import encode_texts, load_llm

        llm = self._data.llm or self._llm.get("llm")
        if llm is None:
            llm = self._llm.setdefault("llm", load_llm(self.config.llm, self.device))
        texts = list(texts)
        encoded = encode_texts(llm, texts, self.config.llm).float().cpu()
        return llm_features.unpadded(llm, texts, self.config.llm, encoded)

    def sample(self, prompt_features: Any, negative: Optional["torch.Tensor"] = None, *, steps: Optional[int] = None,
               guidance_scale: Optional[float] = None, height: Optional[int] = None, width: Optional[int] = None,
               seed: Optional[int] = None) -> "torch.Tensor":
        """Images (P, 3, H, W) in [0, 1] of P prompts ((P, L, D) or P tensors (L_i, D)) with this connector, by
        training.sampling (DDIM, the connector at every step's t); unset arguments are validation.*'s, the
        negative the empty prompt."""
        from .sampling import sample

        v, size = self.config.validation, self.config.data.resolution
        return sample(self.base, self.connector, list(prompt_features),
                      self.empty_features if negative is None else negative, steps=steps or v.steps,
                      guidance_scale=v.guidance_scale if guidance_scale is None else guidance_scale,
                      height=height or v.height or size, width=width or v.width or size,
                      seed=v.seed if seed is None else seed)


# ---------------------------------------------------------------- resolving specs
def resolve(spec: str) -> Hook:
    """The function a spec names, imported; HookError names the spec and what is wrong."""
    match = SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise HookError(f"validation.hooks: {spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    target, name = match["target"], match["function"]
    module = _import_file(spec, target) if target.endswith(".py") or "/" in target or "\\" in target else \
        _import_module(spec, target)
    function = getattr(module, name, None)
    if function is None:
        public = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_")
                        and v.__module__ == module.__name__)[:12]
        raise HookError(f"validation.hooks: {spec!r}: {target} has no function {name!r} (it has {public})")
    if not callable(function):
        raise HookError(f"validation.hooks: {spec!r}: {target}.{name} is a {type(function).__name__}, not a function")
    return Hook(spec, name, function)


def _import_module(spec: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise HookError(f"validation.hooks: {spec!r}: no module {e.name!r} on the Python path (the repository root "
                        "and PYTHONPATH); name a file instead: path/to/file.py:function") from None
    except Exception as e:  # noqa: BLE001 (the user's module may raise anything while importing)
        raise HookError(f"validation.hooks: {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e


def _import_file(spec: str, target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if path.suffix != ".py" or not path.is_file():
        raise HookError(f"validation.hooks: {spec!r}: no such Python file {path}")
    if path not in _FILE_MODULES:
        name = f"ella_tsc_hooks.{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            del sys.modules[name]
            raise HookError(f"validation.hooks: {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        _FILE_MODULES[path] = module
    return _FILE_MODULES[path]


def hook_problems(specs: Sequence[str]) -> list[str]:
    """Config validation: every spec that does not resolve, and hooks that would log under one name."""
    errors, names = [], {}
    for spec in specs:
        try:
            hook = resolve(spec)
        except HookError as e:
            errors.append(str(e))
            continue
        names.setdefault(hook.name, []).append(spec)
    errors += [f"validation.hooks: {specs!r} are all named {name!r} (metrics are logged under the function's "
               "name): give them different names" for name, specs in names.items() if len(specs) > 1]
    return errors


def resolve_hooks(specs: Sequence[str]) -> list[Hook]:
    """The run's hooks (the config validation has resolved them already: the modules are imported once)."""
    problems = hook_problems(specs)
    if problems:
        raise HookError("; ".join(problems))
    return [resolve(spec) for spec in specs]


# ---------------------------------------------------------------- calling them
def metrics_of(hook: Hook, result: Any) -> dict[str, float]:
    """A hook's return value as {name: float}; None is no metrics. HookError names the hook and the value."""
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise HookError(f"evaluation hook {hook.name!r} ({hook.spec}) returned a {type(result).__name__}; "
                        "return a dict of metric names to numbers (or None)")
    out = {}
    for key, value in result.items():
        if not isinstance(key, str) or not key or key in RESERVED:
            raise HookError(f"evaluation hook {hook.name!r} ({hook.spec}) returned the metric name {key!r}: "
                            f"a non-empty string other than {list(RESERVED)} is needed")
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise HookError(f"evaluation hook {hook.name!r} ({hook.spec}) returned {key}={value!r}, "
                            "which is not a number") from None
    return out


def due(hooks: Sequence[Hook], step: int, total: int, every: int) -> bool:
    """Hooks run at every validation (validation.every) and after the last step."""
    return bool(hooks) and ((every > 0 and step % every == 0) or step == total)


def call_hooks(hooks: Sequence[Hook], *, step: int, total: int, ella: "ELLA", ema: Any, base: "Base", data: "Data",
               config: "Config", dist: "Dist", out: Path, write: Callable[[dict], None], reporter: Any,
               llm_holder: Optional[dict] = None) -> list[dict]:
    """Rank 0 calls every hook (the other ranks return at once) and logs what each returns (None: nothing):
    `write` gets the metrics.jsonl record {"step", "hook", metric: value, ...}, the reporter
    eval/<hook>/<metric>. Returns the records. The training connector's mode is restored afterwards; its
    weights are never replaced."""
    if not dist.is_main or not hooks:
        return []
    import torch

    from .validation import ema_model

    model = ema_model(ella, ema, dist.device)  # a copy holding the EMA weights, or the training connector
    was_training = ella.training
    model.eval()
    records = []
    try:
        for hook in hooks:
            context = EvalContext(step, step == total, out, model, base, dist.device, config, data,
                                  llm_holder if llm_holder is not None else {})
            try:
                with torch.no_grad():
                    result = hook.function(context)
            except Exception as e:  # noqa: BLE001 (the user's code)
                raise HookError(f"evaluation hook {hook.name!r} ({hook.spec}) failed at step {step}: "
                                f"{type(e).__name__}: {e}") from e
            if result is None:  # nothing to log
                log.info("step %d: evaluation hook %s returned no metrics", step, hook.name)
                continue
            metrics = metrics_of(hook, result)
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                log.warning("step %d: evaluation hook %s returned non-finite values for %s (logged as they are)",
                            step, hook.name, bad)
            record = {"step": step, "hook": hook.name, **metrics}
            write(record)
            reporter.scalars({f"eval/{hook.name}/{k}": v for k, v in metrics.items()}, step)
            log.info("step %d: evaluation hook %s: %s", step, hook.name,
                     ", ".join(f"{k}={v:.6g}" for k, v in metrics.items()) or "{}")
            records.append(record)
    finally:
        ella.train(was_training)
    return records
