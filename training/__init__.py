"""ELLA connector trainer: `python training/train.py --config training/configs/sd15_1gpu.yaml key=value ...`.

Modules, in the order a run uses them: config (YAML + overrides), data (sources, captions, buckets,
visiting order), cache (precomputed latents and LLM features), models (frozen base and LLM, trainable
connector, EMA), loop (the run), sampling (validation images), checkpoints (atomic save and exact resume),
distributed (process group from the launcher's environment).
"""
