"""One wording for "these weights do not fit this model", shared by the connector and LLM loaders."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

Shapes = Mapping[str, Sequence[int]]


def layout_problems(shapes: Shapes, expected: Shapes, optional: Iterable[str] = ()) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, each with counts and a few examples.

    shapes: what the file holds; expected: what the model built from its config holds; optional: expected
    keys a file may leave out (tied weights). An empty list means the file fits.
    """
    missing = sorted(set(expected) - set(shapes) - set(optional))
    unexpected = sorted(set(shapes) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's {len(expected)} weights are missing (e.g. {missing[:4]})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys are not part of this model (e.g. {unexpected[:4]})")
    wrong = [(k, list(shapes[k]), list(expected[k])) for k in sorted(set(shapes) & set(expected))
             if tuple(shapes[k]) != tuple(expected[k])]
    if wrong:
        listed = "; ".join(f"{k}: file {a}, config {b}" for k, a, b in wrong[:4])
        problems.append(f"{len(wrong)} shape mismatches ({listed})")
    return problems
