"""ComfyUI entry point of the ELLA node pack (V3 `comfy_entrypoint`; the pack registers no legacy mappings).

Outside ComfyUI (pytest collects the repository root as a package, since this file makes it one) there is
no `comfy_api` to import and nothing to register, so the file then defines nothing.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    from comfy_api.latest import ComfyExtension, io

    from .nodes import NODES, register_folders

    from .nodes.routes import register_routes

    register_folders()
    register_routes()

    class ELLAExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> ELLAExtension:
        return ELLAExtension()
