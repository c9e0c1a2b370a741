"""FLUX sigmas as diffusers' FLUX pipelines compute them, for SamplerCustomAdvanced.

The shift itself comes from core ``ModelSamplingFlux`` (fed with the working width and height, it sets
``mu`` from the token count as diffusers' ``calculate_shift`` does). What ComfyUI lacks is the spacing:
its ``simple`` scheduler picks sigmas from a 10000-entry table at ``int(i * 10000 / steps)`` and so lands up to
2e-4 away from the official ``linspace(1, 1/steps, steps)`` for step counts that do not divide 10000 (28 does not).
"""
import comfy.model_sampling
import torch
from comfy_api.latest import io

from ..erasers import omnieraser as core

CATEGORY = "erasekit/sampling"


def pipeline_sigmas(model, steps):
    """``[steps + 1]`` sigmas: the MODEL's own FLUX sigma function at diffusers' timesteps, then 0."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        raise ValueError(
            f"'FLUX Sigmas' needs a FLUX MODEL (its model_sampling is ModelSamplingFlux); this one uses "
            f"{type(sampling).__name__}. Use BasicScheduler for other models.")
    sigmas = sampling.sigma(core.pipeline_timesteps(steps)).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class FluxPipelineSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitFluxPipelineSigmas",
            display_name="FLUX Sigmas (diffusers schedule)",
            category=CATEGORY,
            description=(
                "The sigmas of diffusers' FLUX pipelines (OmniEraser's, FLUX Fill's): timesteps linspace(1, 1/steps, "
                "steps) through the MODEL's shift, then 0. Put core 'ModelSamplingFlux' with the image's width and "
                "height before it: together they give the official token-count shift (mu) exactly."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX MODEL, after ModelSamplingFlux set the shift for the image size."),
                io.Int.Input("steps", default=core.STEPS, min=1, max=10000,
                             tooltip=f"Sampling steps (OmniEraser: {core.STEPS})."),
            ],
            outputs=[io.Sigmas.Output(tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, steps) -> io.NodeOutput:
        return io.NodeOutput(pipeline_sigmas(model, steps))


NODES = [FluxPipelineSigmas]
