"""The command line around the config: `--help` listing every key, and the flags of other trainers answered.

The key list is read from the config dataclasses themselves (type, default, and the comment on the field's
line), so the schema and its help cannot drift apart. Flags of diffusers' example scripts and kohya's sd-scripts
(`--learning_rate 1e-4`) are not accepted as aliases: a run has one spelling per setting (in its config.yaml,
its checkpoints and resume's comparison), and several of those flags do not mean quite the same here. Each is
answered with the key to use instead, value included (`did you mean optim.lr=1e-4?`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import tokenize
import typing
from typing import Any, Iterator, Optional

from .config import Config

# flag of diffusers' train_text_to_image.py / kohya's sd-scripts -> (our key, the value to suggest: None for the
# flag's own value, a template with {value}, or a fixed value for switches; a note when the meaning differs)
FOREIGN_FLAGS: dict[str, tuple[str, Optional[str], str]] = {
    "pretrained_model_name_or_path": ("model.pretrained", None, ""),
    "pretrained_model": ("model.pretrained", None, ""),
    "revision": ("model.revision", None, ""),
    "variant": ("model.variant", None, ""),
    "train_data_dir": ("data.path", None, "a folder, a .jsonl/.csv manifest or tar shards"),
    "dataset_name": ("data.path", None, "a local folder (a Hugging Face imagefolder with metadata.jsonl works)"),
    "in_json": ("data.path", None, "a .jsonl manifest"),
    "image_column": ("data.image_column", None, ""),
    "caption_column": ("data.caption_columns", None, "a list: several caption columns are allowed"),
    "caption_extension": ("data.caption_extension", None, ""),
    "caption_dropout_rate": ("data.caption_dropout", None, ""),
    "resolution": ("data.resolution", None, "the bucket area is about resolution^2"),
    "center_crop": ("data.buckets", "false", "centre square crops instead of aspect-ratio buckets"),
    "enable_bucket": ("data.buckets", "true", ""),
    "bucket_reso_steps": ("data.bucket_step", None, ""),
    "dataloader_num_workers": ("data.num_workers", None, ""),
    "max_data_loader_n_workers": ("data.num_workers", None, ""),
    "output_dir": ("output_dir", None, ""),
    "seed": ("seed", None, ""),
    "learning_rate": ("optim.lr", None, ""),
    "lr": ("optim.lr", None, ""),
    "lr_scheduler": ("optim.schedule", None, "constant, cosine or linear"),
    "lr_warmup_steps": ("optim.warmup_steps", None, ""),
    "adam_beta1": ("optim.betas", "[{value}, 0.999]", "both betas as a list"),
    "adam_beta2": ("optim.betas", "[0.9, {value}]", "both betas as a list"),
    "adam_weight_decay": ("optim.weight_decay", None, ""),
    "adam_epsilon": ("optim.eps", None, ""),
    "max_grad_norm": ("optim.max_grad_norm", None, ""),
    "train_batch_size": ("train.batch_size", None, "per process"),
    "batch_size": ("train.batch_size", None, "per process"),
    "gradient_accumulation_steps": ("train.grad_accum", None, ""),
    "max_train_steps": ("train.max_steps", None, ""),
    "max_steps": ("train.max_steps", None, ""),
    "num_train_epochs": ("train.max_epochs", None, ""),
    "max_train_epochs": ("train.max_epochs", None, ""),
    "epochs": ("train.max_epochs", None, ""),
    "mixed_precision": ("train.mixed_precision", None, "no, fp16 or bf16"),
    "gradient_checkpointing": ("train.gradient_checkpointing", "true", ""),
    "snr_gamma": ("train.min_snr_gamma", None, ""),
    "min_snr_gamma": ("train.min_snr_gamma", None, ""),
    "noise_offset": ("train.noise_offset", None, ""),
    "use_ema": ("train.ema_decay", "0.9999", "the EMA decay itself"),
    "ema_decay": ("train.ema_decay", None, ""),
    "checkpointing_steps": ("train.checkpoint_every", None, ""),
    "save_every_n_steps": ("train.checkpoint_every", None, ""),
    "checkpoints_total_limit": ("train.keep_checkpoints", None, ""),
    "save_last_n_steps_state": ("train.keep_checkpoints", None, "a count of checkpoints"),
    "resume_from_checkpoint": ("train.resume", None, "latest or a checkpoint folder"),
    "report_to": ("train.report_to", None, "tensorboard, wandb or none"),
    "log_with": ("train.report_to", None, "tensorboard, wandb or none"),
    "tracker_project_name": ("train.wandb_project", None, ""),
    "validation_prompt": ("validation.prompts", None, "a list of prompts"),
    "validation_prompts": ("validation.prompts", None, "a list of prompts"),
    "validation_steps": ("validation.every", None, "in steps"),
    "sample_every_n_steps": ("validation.every", None, "in steps"),
    "num_validation_images": ("validation.images_per_prompt", None, ""),
    "validation_epochs": ("validation.every", None, "in steps, not epochs"),
}


def field_docs(cls: type) -> dict[str, str]:
    """{field: the comment on its line} of a dataclass, read from its source."""
    source = inspect.getsource(cls)
    docs: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    line_name: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row = token.start[0]
        if token.type == tokenize.NAME and row not in line_name and token.line.lstrip().startswith(token.string):
            line_name[row] = token.string
        elif token.type == tokenize.COMMENT and line_name.get(row) in names:
            docs.setdefault(line_name[row], token.string.lstrip("#").strip())
    return docs


def _type_label(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " | ".join(_type_label(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_label(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def config_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type, default, description) of every config key, in the schema's order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from config_keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _type_label(tp), getattr(instance, f.name), docs.get(f.name, "")


def keys_help() -> str:
    """The config keys as --help lists them: one line each, grouped by section."""
    import json

    lines, section = ["config keys (override any as section.key=value; values are YAML):"], None
    rows = list(config_keys())
    width = max(len(k) for k, *_ in rows)
    for key, tp, default, doc in rows:
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"\n  {head or '(top level)'}:")
        lines.append(f"    {key:<{width}}  {tp} = {json.dumps(default)}" + (f"  {doc}" if doc else ""))
    return "\n".join(lines)


def all_keys() -> list[str]:
    return [k for k, *_ in config_keys()]


def suggest(name: str, value: Optional[str] = None) -> str:
    """'did you mean optim.lr=1e-4?' for a foreign flag or misspelt key, or '' when nothing is close."""
    bare = name.lstrip("-").replace("-", "_")
    value_text = "<value>" if value is None else value
    if bare in FOREIGN_FLAGS:
        key, fixed, note = FOREIGN_FLAGS[bare]
        if fixed is not None and "{value}" in fixed:
            shown = fixed.format(value=value_text)
        else:
            shown = fixed if fixed is not None and (value is None or fixed in ("true", "false")) else value_text
        return f"did you mean {key}={shown}?" + (f" ({note})" if note else "")
    keys = all_keys()
    leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(bare, keys, n=1, cutoff=0.75)
    if not close:
        close = [leaf[m] for m in difflib.get_close_matches(bare.rsplit(".", 1)[-1], list(leaf), n=1, cutoff=0.75)]
    if not close:
        foreign = difflib.get_close_matches(bare, list(FOREIGN_FLAGS), n=1, cutoff=0.8)
        close = [FOREIGN_FLAGS[foreign[0]][0]] if foreign else []
    return f"did you mean {close[0]}={value_text}?" if close else ""


def split_argv(argv: list[str], own: tuple[str, ...]) -> tuple[list[str], list[tuple[str, Optional[str]]]]:
    """argv -> (the arguments argparse reads, the foreign `--flag [value]` pairs). `own` are our flags; a
    foreign flag's value is `--flag=value` or the next argument when that is neither a flag nor an override."""
    kept: list[str] = []
    foreign: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and name not in own and arg != "--":
            if "=" in arg:
                foreign.append((name, arg.split("=", 1)[1]))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
                foreign.append((name, argv[i + 1]))
                i += 1
            else:
                foreign.append((name, None))
        else:
            kept.append(arg)
        i += 1
    return kept, foreign


def foreign_flags_message(foreign: list[tuple[str, Optional[str]]]) -> str:
    lines = []
    for name, value in foreign:
        hint = suggest(name, value)
        lines.append(f"unknown flag {name}" + (f" {value}" if value is not None else "") + (f": {hint}" if hint
                                                                                              else ""))
    lines.append("settings are given as section.key=value (python training/train.py --help lists every key)")
    return "\n  ".join(lines)
