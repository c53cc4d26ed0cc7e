"""Shared test support: a real ComfyUI server (comfy_server.py) and stand-in packs. The tiny models live in
devtools/ (the benches and the demo use them too)."""
