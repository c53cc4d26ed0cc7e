"""Developer support shared by the tests, the benches and the demo script: tiny random models with real
layouts (tiny_models) and ComfyUI imported in-process with this pack loaded the way ComfyUI loads it
(comfy_env). Not part of the node pack (left out of the registry archive by .comfyignore)."""
