"""Training as users of kohya_ss / diffusers / HF datasets expect it, in-process (fast): list overrides, --help,
other trainers' flags, caption extensions, Hugging Face imagefolders, the held-out split, file modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.training.train_helpers import ROOT, TINY_CONFIG, TRAIN_SCRIPT, synthetic_samples, write_folder

from training.cli import FOREIGN_FLAGS, config_keys, field_docs, split_argv, suggest
from training.config import Config, ConfigError, load_config, parse_value
from training.data import DataConfig, Record, Rejected, Skip, folder_items

REQUIRED = ["model.pretrained=org/base", "llm.source=org/llm"]


def _config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(TINY_CONFIG, REQUIRED + [f"data.path={tmp_path}", *overrides])


# ---------------------------------------------------------------- list-valued overrides
@pytest.mark.parametrize("raw, prompts", [
    ('["a, b", "c"]', ["a, b", "c"]),  # YAML flow syntax: quoted items keep their commas
    ("['a, b', c]", ["a, b", "c"]),
    ("[a, b]", ["a", "b"]),  # unquoted flow items split at commas, as YAML does
    ("a, b", ["a, b"]),  # no brackets: one item, verbatim (a prompt with a comma is one prompt)
    ("a cat, sitting: on a mat #1", ["a cat, sitting: on a mat #1"]),  # colons and # kept (no YAML comment)
    ('"quoted, one"', ["quoted, one"]),
    ("[]", []),
    ("single", ["single"]),
    ("{braces} stay text", ["{braces} stay text"]),  # not a whole {...}: text
])
def test_list_overrides_parse_as_documented(tmp_path, raw, prompts):
    assert _config(tmp_path, f"validation.prompts={raw}").validation.prompts == prompts


@pytest.mark.parametrize("raw, message", [
    ('["a, b", "c"', "not valid YAML flow syntax"),  # unclosed
    ('["a" "b"]', "not valid YAML flow syntax"),  # a missing comma
    ("[a: b, c]", "validation.prompts"),  # a mapping inside the list: not text
    ("[1, [2]]", "validation.prompts"),
    ("{a: 1}", "validation.prompts"),
])
def test_malformed_list_overrides_are_refused_with_the_key(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        _config(tmp_path, f"validation.prompts={raw}")
    assert "validation.prompts" in str(info.value)


@pytest.mark.parametrize("raw, value", [
    ("1e-4", "1e-4"), ("3", 3), ("0.5", 0.5), ("true", True), ("null", None), ("", None), ("~", None),
    ("a: b", "a: b"), ("x # y", "x # y"), ("/data/set.jsonl", "/data/set.jsonl"), ("[1, 2]", [1, 2]), ("{output_dir}/cache", "{output_dir}/cache"),
])
def test_scalar_override_values(raw, value):
    assert parse_value("k", raw) == value


def test_a_scalar_list_override_is_a_one_item_list_and_numbers_stay_numbers(tmp_path):
    c = _config(tmp_path, "data.caption_columns=dense", "optim.betas=[0.8, 0.99]", "data.caption_extension=caption")
    assert c.data.caption_columns == ["dense"] and c.optim.betas == [0.8, 0.99]


# ---------------------------------------------------------------- --help and other trainers' flags
def test_every_config_key_has_a_description():
    rows = list(config_keys())
    assert len(rows) > 60
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented


def test_field_docs_reads_the_comment_on_each_fields_line():
    from dataclasses import dataclass

    @dataclass
    class Probe:
        a: int = 1  # the first
        b: str = "#not a comment"  # the second
        c: float = 0.0

    assert field_docs(Probe) == {"a": "the first", "b": "the second"}


def test_help_lists_every_key_with_type_default_and_description():
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for key, tp, default, doc in config_keys():
        line = next((ln for ln in lines if ln.split() and ln.split()[0] == key), None)
        assert line is not None, key
        assert f"{tp} = {json.dumps(default)}" in line and doc in line, line


FLAG_CASES = [  # (argv, the suggestion expected)
    (["--learning_rate", "1e-4"], "did you mean optim.lr=1e-4?"),
    (["--learning_rate=1e-4"], "did you mean optim.lr=1e-4?"),
    (["--train_batch_size", "4"], "did you mean train.batch_size=4?"),
    (["--max_train_steps", "500"], "did you mean train.max_steps=500?"),
    (["--output_dir", "runs/x"], "did you mean output_dir=runs/x?"),
    (["--resolution", "1024"], "did you mean data.resolution=1024?"),
    (["--mixed_precision", "bf16"], "did you mean train.mixed_precision=bf16?"),
    (["--gradient_accumulation_steps", "2"], "did you mean train.grad_accum=2?"),
    (["--train_data_dir", "/data/imgs"], "did you mean data.path=/data/imgs?"),
    (["--pretrained_model_name_or_path", "org/sd15"], "did you mean model.pretrained=org/sd15?"),
    (["--num_train_epochs", "3"], "did you mean train.max_epochs=3?"),
    (["--report_to", "wandb"], "did you mean train.report_to=wandb?"),
    (["--seed", "42"], "did you mean seed=42?"),
    (["--checkpointing_steps", "250"], "did you mean train.checkpoint_every=250?"),
    (["--resume_from_checkpoint", "latest"], "did you mean train.resume=latest?"),
    (["--max_train_epochs", "10"], "did you mean train.max_epochs=10?"),
    (["--save_every_n_steps", "100"], "did you mean train.checkpoint_every=100?"),
    (["--caption_extension", ".caption"], "did you mean data.caption_extension=.caption?"),
    (["--gradient_checkpointing"], "did you mean train.gradient_checkpointing=true?"),
    (["--use_ema"], "did you mean train.ema_decay=0.9999?"),
    (["--adam_beta2", "0.98"], "did you mean optim.betas=[0.9, 0.98]?"),
    (["--center_crop"], "did you mean data.buckets=false?"),
]


@pytest.mark.parametrize("argv, expected", FLAG_CASES)
def test_other_trainers_flags_are_answered_with_the_matching_key(argv, expected):
    _, foreign = split_argv(argv + ["data.path=x"], ("--config", "--resume", "--help"))
    assert len(foreign) == 1
    assert suggest(*foreign[0]).startswith(expected)


def test_every_suggested_key_exists():
    keys = {k for k, *_ in config_keys()}
    assert {key for key, _, _ in FOREIGN_FLAGS.values()} <= keys


def test_the_script_refuses_foreign_flags_all_at_once_before_loading_anything(tmp_path):
    argv = ["--config", str(TINY_CONFIG), "--learning_rate", "1e-4", "--max_train_steps=9", "--frobnicate",
            f"data.path={tmp_path}", "train.batch_size=2"]
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *argv], capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT))
    assert proc.returncode == 2
    assert "unknown flag --learning_rate 1e-4: did you mean optim.lr=1e-4?" in proc.stderr
    assert "unknown flag --max_train_steps 9: did you mean train.max_steps=9?" in proc.stderr
    assert "unknown flag --frobnicate" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, hint", [
    ("learning_rate=1e-4", "did you mean optim.lr=1e-4?"),
    ("train.max_step=3", "did you mean train.max_steps=3?"),
    ("train.epochs=2", "did you mean train.max_epochs=2?"),
    ("optim.learning_rate=0.1", "did you mean optim.lr=0.1?"),
    ("data.caption_extention=.caption", "did you mean data.caption_extension=.caption?"),
])
def test_misspelt_keys_get_a_suggestion(tmp_path, override, hint):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        _config(tmp_path, override)
    assert hint in str(info.value)


# ---------------------------------------------------------------- config rules of the new keys
@pytest.mark.parametrize("override, message", [
    ("validation.holdout=1.5", "validation.holdout"),
    ("validation.holdout=-1", "validation.holdout"),
    ("validation.images_per_prompt=0", "validation.images_per_prompt"),
    ("train.max_epochs=0", "train.max_epochs"),
    ("train.report_to=comet", "train.report_to"),
    ("data.caption_extension=[]", "data.caption_extension"),
    ("data.caption_extension=a/b", "data.caption_extension"),
])
def test_bad_values_of_the_new_keys(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, override)


def test_max_steps_and_max_epochs_cannot_both_be_null(tmp_path):
    with pytest.raises(ConfigError, match="both null"):
        _config(tmp_path, "train.max_steps=null")
    assert _config(tmp_path, "train.max_steps=null", "train.max_epochs=2").train.max_epochs == 2


def test_holdout_is_a_count_or_a_fraction(tmp_path):
    assert _config(tmp_path, "validation.holdout=10").validation.holdout == 10
    assert _config(tmp_path, "validation.holdout=0.05").validation.holdout == pytest.approx(0.05)


def test_wandb_missing_is_a_config_error_naming_the_fix(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="pip install wandb"):
        _config(tmp_path, "train.report_to=wandb")


# ---------------------------------------------------------------- caption files
def _images(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (_, image, _) in zip(names, synthetic_samples(len(names), seed=1)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)


def _read(root: Path, **data: object) -> tuple[dict[str, list[str]], dict[str, tuple[str, str]]]:
    records, rejected = {}, {}
    for item in folder_items(root, DataConfig(path=str(root), **data)):
        if isinstance(item, Record):
            records[item.key] = item.captions
        else:
            rejected[item.key] = (item.reason, item.detail)
    return records, rejected


@pytest.mark.parametrize("extension, files, expected", [
    (".txt", {"a.txt": "from txt"}, "from txt"),
    (".caption", {"a.caption": "from caption", "a.txt": "from txt"}, "from caption"),
    ("caption", {"a.caption": "no dot given"}, "no dot given"),
    ([".caption", ".txt"], {"a.txt": "fallback"}, "fallback"),
    ([".caption", ".txt"], {"a.caption": "first wins", "a.txt": "second"}, "first wins"),
    ([".txt", ".caption"], {"a.caption": "x", "a.txt": "txt first"}, "txt first"),
    (".caption", {"a.txt": "ignored"}, None),
    ([".caption", ".txt"], {}, None),
])
def test_caption_extension(tmp_path, extension, files, expected):
    _images(tmp_path, ["a.png"])
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    records, rejected = _read(tmp_path, caption_extension=extension)
    if expected is None:
        reason, detail = rejected["a.png"]
        assert reason == Skip.NO_CAPTION and not records
        for e in ([extension] if isinstance(extension, str) else extension):
            assert f"a.{e.lstrip('.')}" in detail  # every name looked for is reported
    else:
        assert records == {"a.png": [expected]} and not rejected


def test_caption_extension_changes_the_cache_key(tmp_path):
    from training.cache import cache_dir

    a = _config(tmp_path, "data.caption_extension=.txt")
    b = _config(tmp_path, "data.caption_extension=.caption")
    assert cache_dir(a, torch.float32) != cache_dir(b, torch.float32)


# ---------------------------------------------------------------- Hugging Face imagefolder
def test_an_imagefolder_with_metadata_jsonl(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "sub/c.png", "stray.png"])
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "text": ["two", "captions"]},
            {"file_name": "sub/c.png", "text": "nested"}, {"file_name": "gone.png", "text": "no such image"},
            {"file_name": "b.png"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.txt").write_text("a .txt beside it is not read in an imagefolder\n")
    records, rejected = _read(tmp_path, caption_columns=["text"])
    assert records == {"a.png": ["first"], "b.png": ["two", "captions"], "sub/c.png": ["nested"],
                       "gone.png": ["no such image"]}
    assert rejected["stray.png"][0] == Skip.NO_CAPTION and "metadata.jsonl" in rejected["stray.png"][1]
    assert [r for r, _ in rejected.values()].count(Skip.NO_CAPTION) == 2  # the stray image and the empty row
    # a missing image file is found when the image is read, like any manifest's (image file not found)
    items = list(folder_items(tmp_path, DataConfig(path=str(tmp_path), caption_columns=["text"])))
    gone = next(i for i in items if isinstance(i, Record) and i.key == "gone.png")
    with pytest.raises(FileNotFoundError):
        gone.load()


def test_imagefolder_split_folders_and_csv_metadata(tmp_path):
    _images(tmp_path, ["train/a.png", "train/b.png", "extra/c.png"])
    (tmp_path / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "caption": "a"}) + "\n" + json.dumps({"file_name": "b.png",
                                                                                 "caption": "b"}) + "\n")
    (tmp_path / "extra" / "metadata.csv").write_text("file_name,caption\nc.png,\"c, with a comma\"\n")
    records, rejected = _read(tmp_path)
    assert records == {"train/a.png": ["a"], "train/b.png": ["b"], "extra/c.png": ["c, with a comma"]}
    assert not rejected


def test_imagefolder_without_the_caption_column_names_its_columns(tmp_path):
    from training.errors import TrainingError

    _images(tmp_path, ["a.png"])
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(TrainingError, match=r"no caption column \['caption'\].*\['file_name', 'text'\].*"
                                            r"data.caption_columns=\[text\]"):
        _read(tmp_path)


# ---------------------------------------------------------------- file modes of atomic writers
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writers_follow_the_umask(tmp_path, umask):
    from ella_core.checkpoint import atomic_save_file
    from training.cache import _atomic_write_text

    old = os.umask(umask)
    try:
        atomic_save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
        _atomic_write_text(tmp_path / "index.json", "{}")
        (tmp_path / "plain").write_text("")  # what open() gives
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("a.safetensors", "index.json", "plain"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


# ---------------------------------------------------------------- the feature cache is shared between runs
def test_cache_is_shared_between_output_dirs_by_default(tmp_path, monkeypatch):
    from training.cache import cache_dir

    monkeypatch.delenv("ELLA_TSC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    data.mkdir()
    a = load_config(None, REQUIRED + [f"data.path={data}", "output_dir=runs/a"])
    b = load_config(None, REQUIRED + [f"data.path={data}", "output_dir=runs/b"])
    assert cache_dir(a, torch.float32) == cache_dir(b, torch.float32)
    assert cache_dir(a, torch.float32).parent == tmp_path / "xdg" / "ella-tsc" / "features"
    monkeypatch.setenv("ELLA_TSC_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir(a, torch.float32).parent == tmp_path / "env"
    per_run = load_config(None, REQUIRED + [f"data.path={data}", "output_dir=runs/a", "cache.dir={output_dir}/cache"])
    assert cache_dir(per_run, torch.float32).parent == Path("runs/a/cache")
    assert cache_dir(per_run, torch.float32).name == cache_dir(a, torch.float32).name  # the same settings' hash


def test_a_relative_data_path_names_its_own_cache_in_each_folder(tmp_path, monkeypatch):
    """Shared caches are keyed by absolute local paths: data/ in two project folders are two data sets."""
    from training.cache import cache_dir

    monkeypatch.setenv("ELLA_TSC_CACHE_DIR", str(tmp_path / "shared"))
    folders = []
    for name in ("one", "two"):
        (tmp_path / name / "data").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / name)
        folders.append(cache_dir(load_config(None, REQUIRED + ["data.path=data"]), torch.float32))
    assert folders[0] != folders[1]


# ---------------------------------------------------------------- the held-out split
@pytest.mark.parametrize("n, holdout, expected", [(100, 10, 10), (100, 0.05, 5), (100, 0.001, 1), (7, 0.5, 4),
                                                  (50, 0, 0), (3, 1, 1)])
def test_holdout_sizes(n, holdout, expected):
    from training.split import split_holdout

    keys = [f"k{i}" for i in range(n)]
    train, held = split_holdout(keys, holdout, seed=0)
    assert len(held) == expected and sorted(train + held) == list(range(n)) and not set(train) & set(held)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_split_depends_on_keys_and_seed_only(seed):
    import random as rnd

    from training.split import split_holdout

    keys = [f"images/{i:05d}.png" for i in range(300)]
    _, held = split_holdout(keys, 0.1, seed)
    chosen = {keys[i] for i in held}
    for trial in range(5):
        shuffled = keys[:]
        rnd.Random(trial).shuffle(shuffled)
        _, again = split_holdout(shuffled, 0.1, seed)
        assert {shuffled[i] for i in again} == chosen  # any source order, so any sharding of it
    _, other = split_holdout(keys, 0.1, seed + 100)
    assert {keys[i] for i in other} != chosen


def test_a_checkpoint_predating_the_new_keys_reports_no_difference(tmp_path):
    from training.config import result_changes

    saved = _config(tmp_path).to_dict()
    for section, key in (("validation", "holdout"), ("data", "caption_extension"), ("train", "max_epochs"),
                         ("train", "report_to"), ("validation", "negative_prompt")):
        del saved[section][key]
    assert result_changes(saved, _config(tmp_path)) == []
    assert result_changes(saved, _config(tmp_path, "data.caption_extension=.caption")) == [
        "data.caption_extension: '.txt' -> '.caption'"]


def test_a_changed_holdout_is_reported_on_resume(tmp_path):
    from training.config import result_changes

    saved = _config(tmp_path, "validation.holdout=10").to_dict()
    assert result_changes(saved, _config(tmp_path, "validation.holdout=10")) == []
    assert result_changes(saved, _config(tmp_path, "validation.holdout=20")) == ["validation.holdout: 10 -> 20"]
    assert result_changes(saved, _config(tmp_path, "validation.holdout=10", "validation.every=5",
                                         "train.report_to=none")) == []


def test_held_out_samples_are_never_in_a_training_batch():
    from training.data import BatchPlan
    from training.split import TrainingSubset, split_holdout

    class Whole(torch.utils.data.Dataset):
        def __getitem__(self, item):
            return item[0]

    keys = [f"{i}.png" for i in range(41)]
    buckets = [(32, 32) if i % 3 else (32, 64) for i in range(41)]
    train, held = split_holdout(keys, 6, seed=3)
    subset = TrainingSubset(Whole(), train)
    for world in (1, 2, 3):
        seen = set()
        for rank in range(world):
            plan = iter(BatchPlan([buckets[i] for i in train], 2, world, rank, seed=0))
            for _ in range(40):  # several epochs
                seen |= {subset[(i, s)] for i, s in next(plan)}
        assert seen and not seen & set(held) and seen <= set(train)


def test_held_out_batches_are_single_bucket_and_cover_each_sample_once(monkeypatch):
    from types import SimpleNamespace

    from training.validation import HeldOut

    buckets = [(32, 32), (32, 64), (64, 32)]
    data = SimpleNamespace(buckets=[buckets[i % 3] for i in range(30)], cache=SimpleNamespace(
        entry=lambda i: {"key": f"{i}.png"}), dataset=None)
    config = load_config(None, REQUIRED + ["data.path=.", "train.batch_size=4", "cache.enabled=true"])
    monkeypatch.setattr("training.validation._eval_dataset", lambda data, config: None)  # batching alone
    held = HeldOut(data, [0, 1, 2, 3, 5, 8, 9, 12, 15, 18, 21, 24, 27, 29], config)
    flat = [i for b in held.batches for i in b]
    assert sorted(flat) == [0, 1, 2, 3, 5, 8, 9, 12, 15, 18, 21, 24, 27, 29]
    assert all(len({data.buckets[i] for i in b}) == 1 and len(b) <= 4 for b in held.batches)
    assert len(set(held.seeds.values())) == len(flat)  # each sample its own fixed seed
