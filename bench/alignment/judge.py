"""Stage 3, the judge: one small CNN, shared by the slots, that says for a slot's half of an image whether it
holds an object and which colour and shape. Trained only on the renderer's ground truth (fresh renders of every
scene of the world, held-out conjunctions included: the judge must know them to score them), with noise, blur,
colour shifts and VAE round trips so it tolerates generated images. Never trained or tuned on generated images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bench.alignment import stage_io, vae as vae_stage, world

COLOUR_NAMES = tuple(world.COLOURS)
Prediction = dict[str, Optional[tuple[str, str]]]  # slot -> (colour, shape) or None (empty)
SETTINGS = ("judge_steps", "judge_batch", "judge_lr", "judge_width", "judge_vae_fraction", "judge_eval_images")


class SlotNet(nn.Module):
    """(B, 3, H, W/2) slot crops in [0, 1] -> logits: presence (B,), colour (B, 4), shape (B, 3)."""

    def __init__(self, *, width: int) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for c_in, c_out, stride in ((3, w, 1), (w, w, 2), (w, 2 * w, 1), (2 * w, 2 * w, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # BatchNorm: 10x fewer steps
        self.head = nn.Linear(2 * w, 1 + len(COLOUR_NAMES) + len(world.SHAPES))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.features(crops * 2 - 1))
        return out[:, 0], out[:, 1:1 + len(COLOUR_NAMES)], out[:, 1 + len(COLOUR_NAMES):]


def slot_crops(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N * slots, 3, H, W / slots): slot-major within each image (left then right)."""
    n, c, h, w = images.shape
    return images.reshape(n, c, h, len(world.SLOTS), w // len(world.SLOTS)).permute(0, 3, 1, 2, 4).reshape(
        n * len(world.SLOTS), c, h, w // len(world.SLOTS))


class Judge:
    """The trained SlotNet and the image size it reads."""

    def __init__(self, net: SlotNet, image_size: int) -> None:
        self.net, self.image_size = net.eval(), image_size

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[Prediction]:
        """images (N, 3, H, W) in [0, 1] -> per image {slot: (colour, shape) or None}."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        presence, colour, shape = self.net(slot_crops(images.float().clamp(0, 1)))
        k = len(world.SLOTS)
        out = []
        for i in range(len(images)):
            pred: Prediction = {}
            for j, slot in enumerate(world.SLOTS):
                r = i * k + j
                pred[slot] = ((COLOUR_NAMES[int(colour[r].argmax())], world.SHAPES[int(shape[r].argmax())])
                              if presence[r] > 0 else None)
            out.append(pred)
        return out


def score(prediction: Prediction, scene: world.Scene) -> dict[str, Any]:
    """binding: every slot right (colour AND shape, or empty); objects_correct: the scene's objects drawn right
    in their slots; count_ok: as many objects as asked; colour_ok / shape_ok: the sets of colours / shapes right
    regardless of slot (all a bag of words can get)."""
    truth: Prediction = {slot: None for slot in world.SLOTS}
    truth.update({o.slot: o.conjunction for o in scene})
    drawn = [v for v in prediction.values() if v is not None]
    return {
        "binding": all(prediction.get(s) == truth[s] for s in world.SLOTS),
        "objects_correct": sum(prediction.get(o.slot) == o.conjunction for o in scene),
        "count_ok": len(drawn) == len(scene),
        "colour_ok": sorted(c for c, _ in drawn) == sorted(o.colour for o in scene),
        "shape_ok": sorted(s for _, s in drawn) == sorted(o.shape for o in scene),
        "n_drawn": len(drawn),
    }


# ---------------------------------------------------------------- training
def _targets(scenes: Sequence[world.Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slot crop (slot-major per image): presence, colour index, shape index (-1 where empty)."""
    presence, colour, shape = [], [], []
    for scene in scenes:
        by_slot = {o.slot: o for o in scene}
        for slot in world.SLOTS:
            o = by_slot.get(slot)
            presence.append(float(o is not None))
            colour.append(COLOUR_NAMES.index(o.colour) if o else -1)
            shape.append(world.SHAPES.index(o.shape) if o else -1)
    return torch.tensor(presence), torch.tensor(colour), torch.tensor(shape)


def _random_scenes(n: int, rng: np.random.Generator) -> list[world.Scene]:
    """Every scene of the world, plus the empty one now and then (a generated image may hold nothing)."""
    scenes = world.all_scenes() + [()]
    return [scenes[i] for i in rng.integers(len(scenes), size=n)]


def _render(scenes: Sequence[world.Scene], size: int, rng: np.random.Generator) -> torch.Tensor:
    arrays = [np.asarray(world.render(sc, size, rng), np.float32) / 255 for sc in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur (sigma up to 1.2 px), brightness and per-channel colour shifts, pixel noise (sigma up to 0.1)."""
    n = len(images)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    sigma = u(n) * 1.2
    radius = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-radius[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, 5), separable
    x = images.reshape(1, n * 3, *images.shape[-2:])
    k = kernel.repeat_interleave(3, 0)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * 3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=n * 3)
    x = x.reshape(images.shape)
    x = x * (0.85 + 0.3 * u(n, 1, 1, 1)) + (u(n, 3, 1, 1) - 0.5) * 0.16
    x = x + torch.randn(x.shape, generator=gen) * (u(n, 1, 1, 1) * 0.1)
    return x.clamp(0, 1)


def train_judge(workdir: Path, profile: Any, progress: Any = print) -> Judge:
    """Fresh renders every step (never generated images), augmented, a fraction through the stage-2 VAE."""
    rng = np.random.default_rng([profile.seed, 3])
    gen = torch.Generator().manual_seed(profile.seed + 3)
    vae = vae_stage.load_vae(workdir) if profile.judge_vae_fraction > 0 else None
    net = SlotNet(width=profile.judge_width)
    opt = torch.optim.AdamW(net.parameters(), lr=profile.judge_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=profile.judge_lr, total_steps=profile.judge_steps)
    log_every = max(1, profile.judge_steps // 10)
    n_vae = int(round(profile.judge_batch * profile.judge_vae_fraction))
    for step in range(profile.judge_steps):
        scenes = _random_scenes(profile.judge_batch, rng)
        images = _render(scenes, profile.image_size, rng)
        if vae is not None and n_vae:
            images[:n_vae] = vae_stage.round_trip(vae, images[:n_vae])
        loss = _loss(net, augment(images, gen), scenes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            progress(f"step {step + 1}/{profile.judge_steps} loss {loss.item():.4f}")
    return Judge(net.eval().requires_grad_(False), profile.image_size)


def _loss(net: SlotNet, images: torch.Tensor, scenes: Sequence[world.Scene]) -> torch.Tensor:
    presence, colour, shape = _targets(scenes)
    p, c, s = net(slot_crops(images))
    full = presence > 0
    return (F.binary_cross_entropy_with_logits(p, presence) + F.cross_entropy(c[full], colour[full])
            + F.cross_entropy(s[full], shape[full]))


def save_judge(judge: Judge, path: Path, width: int) -> None:
    meta = {"width": str(width), "image_size": str(judge.image_size), "slots": json.dumps(world.SLOTS),
            "colours": json.dumps(COLOUR_NAMES), "shapes": json.dumps(world.SHAPES)}
    save_file({k: v.contiguous() for k, v in judge.net.state_dict().items()}, str(path), metadata=meta)


def load_judge(workdir: Path) -> Judge:
    from safetensors import safe_open

    path = Path(workdir) / "judge" / "judge.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if json.loads(meta["colours"]) != list(COLOUR_NAMES) or json.loads(meta["shapes"]) != list(world.SHAPES):
        raise ValueError(f"{path} was trained for colours {meta['colours']} / shapes {meta['shapes']}, "
                         f"the world has {COLOUR_NAMES} / {world.SHAPES}: rerun the judge stage")
    net = SlotNet(width=int(meta["width"]))
    net.load_state_dict(load_file(str(path)))
    return Judge(net.requires_grad_(False), int(meta["image_size"]))


# ---------------------------------------------------------------- evaluation
def accuracy(judge: Judge, images: torch.Tensor, scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Mean binding / slot / count accuracy of the judge on images whose scenes are known."""
    preds = [p for x in images.split(256) for p in judge.predict(x)]
    rows = [score(p, sc) for p, sc in zip(preds, scenes)]
    slots = [p.get(s) == ({o.slot: o.conjunction for o in sc}.get(s)) for p, sc in zip(preds, scenes) for s in world.SLOTS]
    return {"binding": float(np.mean([r["binding"] for r in rows])), "slot": float(np.mean(slots)),
            "count": float(np.mean([r["count_ok"] for r in rows]))}


def build(workdir: Path, profile: Any) -> dict[str, Any]:
    """Stage 3: `<workdir>/judge/judge.safetensors`; figures: the judge's accuracy on fresh renders (clean and
    augmented), on the test folders' renders and on their VAE reconstructions."""
    workdir = Path(workdir)
    stage = workdir / "judge"
    settings = {"vae": stage_io.settings_of(workdir / "vae"), **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, settings)) is not None:
        return figures
    progress = stage_io.begin(stage, profile, seed=True)
    judge = train_judge(workdir, profile, progress)
    save_judge(judge, stage / "judge.safetensors", profile.judge_width)
    rng = np.random.default_rng([profile.seed, 33])  # renders the judge never saw
    scenes = _random_scenes(profile.judge_eval_images, rng)
    fresh = _render(scenes, profile.image_size, rng)
    figures: dict[str, Any] = {"fresh": accuracy(judge, fresh, scenes),
                               "fresh_augmented": accuracy(judge, augment(fresh, torch.Generator().manual_seed(33)), scenes)}
    vae = vae_stage.load_vae(workdir)
    for split in ("test_seen", "test_heldout"):
        rows = world.load_scenes(workdir / "world" / split)
        images = vae_stage.load_images([p for p, _, _ in rows])
        split_scenes = [sc for _, sc, _ in rows]
        figures[split] = accuracy(judge, images, split_scenes)
        figures[f"{split}_vae"] = accuracy(judge, vae_stage.round_trip(vae, images), split_scenes)
    figures["seconds"] = round(progress.elapsed, 1)
    progress("binding accuracy: " + ", ".join(f"{k} {v['binding']:.3f}" for k, v in figures.items() if isinstance(v, dict)))
    return stage_io.finish(stage, settings, figures)
