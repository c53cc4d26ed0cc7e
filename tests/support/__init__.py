"""Shared test support: tiny models (tiny_models.py) and a real ComfyUI server (comfy_server.py)."""
