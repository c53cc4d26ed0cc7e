"""ELLA connector trainer: `python training/train.py --config training/configs/sd15_1gpu.yaml key=value ...`.

Modules, in the order a run uses them: stopping (SIGTERM/SIGINT in every phase), config (YAML + overrides,
a typed schema validated completely before anything loads), data (sources, stable skip reasons, captions,
buckets, visiting order, the loader), tarfiles (strict tar reading), cache (precomputed latents and LLM
features, resumable, checked finite), models (frozen base and LLM, trainable connector, EMA), loop (the
run), sampling (validation images), checkpoints (atomic, checksummed save and exact resume), distributed
(process group from the launcher's environment; no rank waits forever), errors (the user-facing failure).
"""
