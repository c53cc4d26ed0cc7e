"""Train an ELLA connector.

    python training/train.py --config training/configs/sd15_1gpu.yaml data.path=/data/my_set train.max_steps=5000
    torchrun --nproc_per_node 8 training/train.py --config training/configs/sd15_8gpu.yaml
    python training/train.py --config ... --resume latest

Overrides are `section.key=value` (values parsed as YAML). See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `training` and `ella_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.stopping import Stop, StopRequested  # noqa: E402

EXIT_CONFIG, EXIT_FAILED = 2, 1  # a stop on a signal exits with 128 + its number (143 for SIGTERM)


def main(argv: list[str] | None = None) -> int:
    stop = Stop().install()  # first: a SIGTERM during start-up ends the run at once
    try:
        return _main(argv, stop)
    except StopRequested as e:
        print(f"stopped: {e.what}", file=sys.stderr)
        return e.exit_code


def _main(argv: list[str] | None, stop: Stop) -> int:
    from training.cli import foreign_flags_message, keys_help, split_argv

    parser = argparse.ArgumentParser(description="Train an ELLA connector (only the connector learns).",
                                     epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML config file (training/configs/*.yaml)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (same as train.resume=...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    known, foreign = split_argv(list(sys.argv[1:] if argv is None else argv), ("--config", "--resume", "--help"))
    if foreign and not {"-h", "--help"} & set(known):
        print(f"config error: {foreign_flags_message(foreign)}", file=sys.stderr)
        return EXIT_CONFIG
    args = parser.parse_args(known)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    from training.config import ConfigError, load_config

    try:
        config = load_config(args.config, overrides)  # validated completely before torch is even imported
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from ella_core import ELLACheckpointError, TextEncoderError, WidthMismatchError
    from training.errors import TrainingError
    from training.loop import run

    try:
        run(config, stop)
    except (TrainingError, ELLACheckpointError, TextEncoderError, WidthMismatchError) as e:  # the user's to fix
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    code = main()
    group = sys.modules.get("torch.distributed")
    if code and group is not None and group.is_available() and group.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a failed rank skips interpreter teardown, where a live gloo group can abort (-6)
    sys.exit(code)
