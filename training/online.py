"""Online text encoding: the frozen LLM stays on each process's device and encodes every micro-batch's captions.

Used by cache.mode=latents (latents read from the cache, captions encoded now) and cache.mode=none (the VAE
runs per batch too), for data too large to cache every caption's features. It gives the features a full
cache holds for the same sample visits: the caption and the dropout are chosen in the dataset from the
visit's seed (training.data.pick_text, as for the cache), the encoder runs with the same settings, and a
dropped caption gets the empty prompt's features encoded once, alone, exactly as the cache stores them.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from . import features as llm_features
from .cache import check_finite, llm_fix
from .config import Config
from .distributed import Dist
from .models import encode_texts, load_llm

log = logging.getLogger("training")


def load_resident_llm(config: Config, dist: Dist) -> tuple[Any, torch.Tensor]:
    """The frozen LLM on this process's device (llm.device, else the training device) in llm.dtype, and the
    empty prompt's features (L, D), float32 on the CPU, encoded once."""
    where = "loading the LLM for online encoding"
    with dist.failing_together(where):
        llm = load_llm(config.llm, dist.device)
        empty = encode_texts(llm, [""], config.llm)  # (1, L, D)
        check_finite(empty, ["''"], "LLM features of the empty prompt", llm_fix(config))
    dist.agree(where, 2)
    log.info("online encoding: %s resident on %s in %s", config.llm.source, llm.device, llm.dtype)
    return llm, llm_features.unpadded(llm, [""], config.llm, empty)[0].float().cpu()  # flexible: its own length


def batch_features(llm: Any, texts: list[str], empty: torch.Tensor, config: Config, keys: list[str]
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Captions (B,) -> features (B, L, D) float32 on the LLM's device, without gradients, in the LLM's own
    dtype (outside any autocast), and the text_bias hiding flexible-mode padding (None when all B rows have
    the same length, as always in fixed mode). An empty text (a dropped caption; real captions are never
    empty) gets `empty` (L, D); only the others go through the LLM, in one batch."""
    rows = [empty.to(llm.device)] * len(texts)
    kept = [i for i, text in enumerate(texts) if text]
    if kept:
        kept_texts = [texts[i] for i in kept]
        with torch.no_grad(), torch.autocast(llm.device.type, enabled=False):
            encoded = encode_texts(llm, kept_texts, config.llm)  # (K, L, D)
        check_finite(encoded, [keys[i] for i in kept], "LLM features", llm_fix(config))
        for i, f in zip(kept, llm_features.unpadded(llm, kept_texts, config.llm, encoded.float())):
            rows[i] = f
    return llm_features.pad_batch(rows)
