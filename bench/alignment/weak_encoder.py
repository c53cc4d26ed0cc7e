"""The base's deliberately weak text encoder: one context-free embedding per word, no positions, padded to a
fixed length. The UNet's cross-attention has no positions either, so what it sees is a bag of words: "a red
circle on the left and a blue square on the right" and "a blue circle on the left and a red square on the
right" give the same context up to token order, which attention cannot see."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.alignment import world

PAD, UNK = "<pad>", "<unk>"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def world_vocabulary() -> list[str]:
    """Every word the world's captions can use (templates, slot phrases, colours, shapes)."""
    text = " ".join([*world.ONE, *world.TWO, *(p for ps in world.SLOT_PHRASES.values() for p in ps),
                     *world.COLOURS, *world.SHAPES, *world.SLOTS])
    vocab = sorted(set(words(re.sub(r"\{[a-z]+\}", " ", text))))
    return [PAD, UNK, *vocab]


class WeakEncoder(nn.Module):
    """captions -> (B, length, dim): per-word embeddings, then `<pad>` embeddings up to `length`."""

    def __init__(self, *, vocabulary: Sequence[str], dim: int, length: int) -> None:
        super().__init__()
        self.vocabulary, self.length = list(vocabulary), length
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.embed = nn.Embedding(len(self.vocabulary), dim)

    @property
    def dim(self) -> int:
        return self.embed.embedding_dim

    def token_ids(self, captions: Sequence[str]) -> torch.Tensor:
        rows = []
        for text in captions:
            ids = [self.index.get(w, self.index[UNK]) for w in words(text)]
            if len(ids) > self.length:
                raise ValueError(f"caption {text!r} has {len(ids)} words, the weak encoder holds {self.length}: "
                                 "raise Profile.text_length")
            rows.append(ids + [self.index[PAD]] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.embed.weight.device)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        return self.embed(self.token_ids(captions))

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Without gradients: (B, length, dim)."""
        with torch.no_grad():
            return self(captions)

    def save(self, path: Path) -> None:
        meta = {"vocabulary": json.dumps(self.vocabulary), "length": str(self.length), "dim": str(self.dim)}
        save_file({"embed.weight": self.embed.weight.detach().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "WeakEncoder":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        encoder = cls(vocabulary=json.loads(meta["vocabulary"]), dim=int(meta["dim"]), length=int(meta["length"]))
        encoder.load_state_dict(load_file(str(path)))
        return encoder.eval().requires_grad_(False)
