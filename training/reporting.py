"""Where metrics and validation images go besides metrics.jsonl (always written): train.report_to.

tensorboard (default) writes <output_dir>/tensorboard; wandb is imported only when chosen, and is left to
read its own environment (WANDB_MODE=offline, WANDB_API_KEY, WANDB_DIR, ...); none writes nothing else.
Only rank 0 reports.
"""

from __future__ import annotations

import uuid
from pathlib import Path
import torch

from .config import Config
from .errors import TrainingError


class Reporter:
    """report_to=none; the base of the others."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """images (N, 3, H, W) in [0, 1]."""

    def close(self) -> None:
        pass


class TensorboardReporter(Reporter):
    def __init__(self, folder: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: what a stopped run logged after the checkpoint resumed from is dropped, as in metrics.jsonl
        self.writer = SummaryWriter(str(folder), purge_step=resumed_step + 1 if resumed_step else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        self.writer.add_images(tag, images, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """One wandb run per output_dir: its id is kept in <output_dir>/wandb_run_id, so a resumed run continues
    it (wandb ignores steps it has already seen)."""

    def __init__(self, out: Path, config: Config) -> None:
        try:
            import wandb
        except ImportError as e:
            raise TrainingError("train.report_to=wandb needs the wandb package: pip install wandb (or "
                                "train.report_to=tensorboard / none)") from e
        self.wandb = wandb
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=config.train.wandb_project, name=out.resolve().name, id=run_id,
                              resume="allow", dir=str(out), config=config.to_dict())

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        arrays = [(image.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for image in images]
        self.run.log({tag: [self.wandb.Image(a) for a in arrays]}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporter(config: Config, out: Path, resumed_step: int, is_main: bool) -> Reporter:
    kind = config.train.report_to
    if not is_main or kind == "none":
        return Reporter()
    if kind == "wandb":
        return WandbReporter(out, config)
    return TensorboardReporter(out / "tensorboard", resumed_step)

