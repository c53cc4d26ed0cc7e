"""Stage 1, the world: flat-colour shapes in a left and a right slot of a 32 px image, with captions that say
what is where in varied order and phrasing.

Binding is learnable from word order and impossible for a bag of words: every two-object scene has objects
of different colours AND different shapes, so "a red circle on the left and a blue square on the right" and
"a blue circle on the left and a red square on the right" hold the same words (so do the two orders of
"a red circle to the left of a blue square"). Held out: `HELDOUT` colour-shape conjunctions, never drawn in
any training scene, while every colour and every shape alone is.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from bench.alignment import stage_io

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
SLOTS = ("left", "right")
# one per colour but yellow and one per shape: each colour and each shape keeps training conjunctions
HELDOUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
BACKGROUND = 0.2  # dark grey: every colour stands out

SLOT_PHRASES = {s: (f"on the {s}", f"at the {s}", f"in the {s} half") for s in SLOTS}
ONE = ("a {a} {pa}", "{pa}, a {a}", "there is a {a} {pa}")
TWO = ("a {a} {pa} and a {b} {pb}", "{pa} a {a}, {pb} a {b}", "a {a} {pa}, a {b} {pb}",
       "{pa} there is a {a} and {pb} a {b}", "a {a} to the {sa} of a {b}")


@dataclass(frozen=True, order=True)
class Obj:
    colour: str
    shape: str
    slot: str

    @property
    def conjunction(self) -> tuple[str, str]:
        return (self.colour, self.shape)


Scene = tuple[Obj, ...]  # 1-2 objects in distinct slots, sorted by slot order


@dataclass(frozen=True)
class Splits:
    train: list[Scene]
    test_seen: list[Scene]
    test_heldout: list[Scene]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption stating each object's colour, shape and slot, in a random order and phrasing."""
    objs = list(scene)
    rng.shuffle(objs)
    phrase = {o: SLOT_PHRASES[o.slot][rng.integers(len(SLOT_PHRASES[o.slot]))] for o in objs}
    name = {o: f"{o.colour} {o.shape}" for o in objs}
    if len(objs) == 1:
        (a,) = objs
        return ONE[rng.integers(len(ONE))].format(a=name[a], pa=phrase[a])
    a, b = objs
    return TWO[rng.integers(len(TWO))].format(a=name[a], pa=phrase[a], b=name[b], pb=phrase[b], sa=a.slot)


def render(scene: Scene, size: int, rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """The scene on a slightly noisy dark background, with small jitter of size, position and colour."""
    s = size * supersample
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    shade = BACKGROUND + rng.uniform(-0.03, 0.03)
    image = np.full((s, s, 3), shade, np.float32)
    for obj in scene:
        r = rng.uniform(0.15, 0.19) * s
        cx = (SLOTS.index(obj.slot) + 0.5) * s / len(SLOTS) + rng.uniform(-0.04, 0.04) * s
        cy = s / 2 + rng.uniform(-0.1, 0.1) * s
        colour = np.clip(np.array(COLOURS[obj.colour]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
        image[_mask(obj.shape, xx - cx, yy - cy, r)] = colour
    small = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.BOX)
    pixels = np.asarray(small, np.float32) / 255 + rng.normal(0, 0.015, (size, size, 1))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside a shape of about the same area centred at (0, 0); y points down."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.88 * r) & (np.abs(dy) <= 0.88 * r)
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        top, bottom, half = -1.15 * r, 0.8 * r, 1.15 * r
        inside_y = (dy >= top) & (dy <= bottom)
        return inside_y & (np.abs(dx) <= half * (dy - top) / (bottom - top))
    raise ValueError(f"unknown shape {shape!r}; the world's shapes are {SHAPES}")


def all_scenes() -> list[Scene]:
    """Every scene of the world: one object in a slot, or two objects differing in colour and in shape."""
    conj = list(itertools.product(COLOURS, SHAPES))
    scenes: list[Scene] = [(Obj(c, s, slot),) for (c, s) in conj for slot in SLOTS]
    for (c1, s1), (c2, s2) in itertools.product(conj, conj):
        if c1 != c2 and s1 != s2:
            scenes.append((Obj(c1, s1, SLOTS[0]), Obj(c2, s2, SLOTS[1])))
    return scenes


def is_heldout(scene: Scene) -> bool:
    return any(o.conjunction in HELDOUT for o in scene)


def make_splits(profile: Any, seed: int) -> Splits:
    """Training scenes drawn from the scenes without a held-out conjunction (one object with probability
    profile.single_object_fraction); test scenes are two-object scenes, seen (training compositions) or
    held-out (at least one held-out conjunction), cycled through in a seeded order."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    seen = [sc for sc in scenes if not is_heldout(sc)]
    ones, twos = [sc for sc in seen if len(sc) == 1], [sc for sc in seen if len(sc) == 2]
    train = [ones[rng.integers(len(ones))] if rng.random() < profile.single_object_fraction
             else twos[rng.integers(len(twos))] for _ in range(profile.n_train)]
    heldout = [sc for sc in scenes if is_heldout(sc) and len(sc) == 2]
    splits = Splits(train, _cycle(twos, profile.n_test_seen, rng), _cycle(heldout, profile.n_test_heldout, rng))
    _check(splits)
    return splits


def _cycle(pool: list[Scene], n: int, rng: np.random.Generator) -> list[Scene]:
    order = [pool[i] for i in rng.permutation(len(pool))]
    return [order[i % len(order)] for i in range(n)]


def _check(splits: Splits) -> None:
    """The held-out property: no held-out conjunction in training, every colour and shape alone in it."""
    trained = {o.conjunction for sc in splits.train for o in sc}
    assert not trained & HELDOUT, f"held-out conjunctions in training: {sorted(trained & HELDOUT)}"
    assert all(is_heldout(sc) for sc in splits.test_heldout), "a held-out test scene has no held-out conjunction"
    assert {c for c, _ in trained} == set(COLOURS), f"colours missing from training: {set(COLOURS) - {c for c, _ in trained}}"
    assert {s for _, s in trained} == set(SHAPES), f"shapes missing from training: {set(SHAPES) - {s for _, s in trained}}"
    assert {o.conjunction for sc in splits.test_seen for o in sc} <= trained, "a seen test scene has an unseen conjunction"


def scene_to_json(scene: Scene) -> list[dict[str, str]]:
    return [{"colour": o.colour, "shape": o.shape, "slot": o.slot} for o in scene]


def scene_from_json(objects: Sequence[dict[str, str]]) -> Scene:
    return tuple(sorted((Obj(o["colour"], o["shape"], o["slot"]) for o in objects), key=lambda o: SLOTS.index(o.slot)))


def write_imagefolder(scenes: Sequence[Scene], root: Path, size: int, seed: int, captions_per_image: int = 1) -> None:
    """`root/<i>.png` + `root/<i>.txt` (distinct captions, one a line: train.py's folder format) +
    `root/scenes.jsonl` (ground truth: {"image", "objects", "captions"} per line). Seeded per image."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "scenes.jsonl", "w") as index:
        for i, scene in enumerate(scenes):
            rng = np.random.default_rng([seed, i])
            name = f"{i:05d}"
            render(scene, size, rng).save(root / f"{name}.png")
            captions = list(dict.fromkeys(caption(scene, rng) for _ in range(captions_per_image)))
            (root / f"{name}.txt").write_text("\n".join(captions) + "\n")
            index.write(json.dumps({"image": f"{name}.png", "objects": scene_to_json(scene), "captions": captions}) + "\n")


def load_scenes(root: Path) -> list[tuple[Path, Scene, list[str]]]:
    """(image path, scene, captions) of an image folder written by `write_imagefolder`, in order."""
    rows = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines() if line.strip()]
    return [(root / r["image"], scene_from_json(r["objects"]), r["captions"]) for r in rows]


SPLIT_NAMES = ("train", "test_seen", "test_heldout")
SETTINGS = ("seed", "image_size", "n_train", "n_test_seen", "n_test_heldout", "captions_per_image",
            "single_object_fraction")


def build(workdir: Path, profile: Any) -> dict[str, Any]:
    """Stage 1: `<workdir>/world/{train,test_seen,test_heldout}/` image folders; cached by done.json."""
    stage = Path(workdir) / "world"
    settings = profile.settings(*SETTINGS)
    if (figures := stage_io.cached(stage, settings)) is not None:
        return figures
    progress = stage_io.Progress("world")
    stage_io.start(stage)
    splits = make_splits(profile, profile.seed)
    for k, name in enumerate(SPLIT_NAMES):
        per_image = profile.captions_per_image if name == "train" else 1
        write_imagefolder(getattr(splits, name), stage / name, profile.image_size, seed=profile.seed * 100 + k,
                          captions_per_image=per_image)
        progress(f"{name}: {len(getattr(splits, name))} images")
    figures = {name: len(getattr(splits, name)) for name in SPLIT_NAMES}
    figures.update(heldout_conjunctions=sorted(" ".join(c) for c in HELDOUT),
                   train_two_object_fraction=float(np.mean([len(sc) == 2 for sc in splits.train])),
                   distinct_train_scenes=len(set(splits.train)), seconds=round(progress.elapsed, 1))
    return stage_io.finish(stage, settings, figures)
