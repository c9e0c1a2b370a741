"""EraseKit: object removal for ComfyUI (SmartEraser, Erase Diffusion, OmniEraser).

ComfyUI loads this folder as a custom node pack through ``comfy_entrypoint``. The same folder is the
``erasekit`` Python package (``pip install -e .``) for the command-line tools; nothing here imports
ComfyUI until ComfyUI itself asks for the node list.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import all_nodes

    class EraseKitExtension(ComfyExtension):
        async def get_node_list(self):
            return all_nodes()

    return EraseKitExtension()
