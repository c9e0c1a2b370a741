"""Erase Diffusion's self-rectifying attention on any UNet or FLUX MODEL, and Attentive Eraser's removal guider.

The patch rides on ComfyUI's ``optimized_attention_override`` (every attention back-end is wrapped by
``wrap_attn``): the back-end, and any override chained before this one, computes plain attention for the queries
outside the mask, while the queries inside it attend to the keys outside it (``erasers.attention``). The form is
picked by the tensors' device (``core.strategy_for``): on CPU the outside queries go to the back-end in groups of
rows; on CUDA and other accelerators the back-end runs once over all queries and once, dense, over the inside
queries and the gathered outside keys (token indices computed once per token grid and reused across steps).
An APPLY_MODEL wrapper gives each model call the mask at the latent's size and the FLUX text length; on UNets an
attn1 patch pair marks which attention calls are self-attention (cross-attention is never touched). Existing
overrides, wrappers and patches are kept and chained.
"""
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
from comfy_api.latest import io

from ..erasers import attention as core

CATEGORY = "erasekit/attention"
BLOCKS_ALL = "all"
BLOCKS_OUTPUT = "output (decoder)"
BLOCK_OPTIONS = [BLOCKS_ALL, BLOCKS_OUTPUT]
UNET, FLUX = "unet", "flux"
# ComfyUI attention back-ends: (q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, **kwargs)
BACKEND_OPTIONS = ("mask", "attn_precision", "skip_reshape", "skip_output_reshape")
MASK_TOOLTIP = ("Object mask of the image being inpainted, 1 = remove; thresholded at 0.5. Any size with the "
                "latent's aspect; a batch of 1 or one mask per latent.")
BLOCKS_TOOLTIP = ("UNet blocks whose self-attention is rectified: all (Erase Diffusion) or only the decoder's "
                  "output blocks (Attentive Eraser's layers 34-70 of SDXL). FLUX always uses every block.")


def model_kind(model_patcher):
    """``"unet"`` (SD1.x, SD2.x, SDXL, their inpainting variants) or ``"flux"`` (FLUX, Fill, OmniEraser)."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    net = model_patcher.model.diffusion_model
    if isinstance(net, Flux):
        return FLUX
    if isinstance(net, UNetModel):
        return UNET
    raise ValueError(f"Self-rectifying attention supports UNet (SD1.x, SD2.x, SDXL) and FLUX models; this MODEL's "
                     f"diffusion model is {type(net).__name__}.")


def require_attention_override():
    """ComfyUI routes attention through ``optimized_attention_override`` since 0.3.5x; fail clearly before."""
    import comfy.ldm.modules.attention as attention

    if not hasattr(attention, "wrap_attn"):
        raise RuntimeError("This ComfyUI has no optimized_attention_override hook (comfy/ldm/modules/attention.py "
                           "wrap_attn); update ComfyUI to 0.3.60 or newer to use self-rectifying attention.")


class _CallState:
    """What one model call needs: the latent mask on the call's batch and the token masks made from it. ``key``
    names that latent mask (latent size, device, conditionings per batch) for the caches that outlive the call."""

    def __init__(self, latent_mask, text_length, key):
        self.latent_mask = latent_mask
        self.text_length = text_length
        self.key = key
        self.blocked = {}


class SelfRectifyingAttention:
    """The patch: config, the chained attention override and the per-call wrapper. One instance per node run."""

    def __init__(self, mask, kind, strength=1.0, start_percent=0.0, end_percent=1.0, blocks=BLOCKS_ALL):
        require_attention_override()
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        self.mask = mask.detach().to("cpu", torch.float32)
        self.kind = kind
        self.strength = float(strength)
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.output_blocks_only = blocks == BLOCKS_OUTPUT
        self.query_scale = 1.0  # the guider lowers it for similarity suppression
        self.key = f"erasekit_sra_{id(self):x}"
        self._latent_cache = {}
        self._split_cache = {}  # token indices per (latent, token grid): the mask is the same at every step
        self._in_self_attention = False

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options; the patch is shared, like a function

    # ------------------------------------------------------------ installation
    def apply_to(self, model_patcher):
        """A clone of ``model_patcher`` with this patch added after whatever is already there (the node's way)."""
        patched = model_patcher.clone()
        self._chain_override(patched.model_options)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        if self.kind == UNET:
            patched.set_model_attn1_patch(self._enter_self_attention)
            patched.set_model_attn1_output_patch(self._leave_self_attention)
        return patched

    def install(self, model_options):
        """A copy of ``model_options`` with this patch added (the guider's redirected pass, which has no patcher).

        The same patch as ``apply_to``, through the helpers ComfyUI has for plain ``model_options``; it has none for
        attn1 patches, so those are appended as ``ModelPatcher.set_model_patch`` does."""
        opts = comfy.model_patcher.create_model_options_clone(model_options)
        self._chain_override(opts)
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key,
                                                     self._apply_model, opts, is_model_options=True)
        if self.kind == UNET:
            patches = opts["transformer_options"].setdefault("patches", {})
            patches["attn1_patch"] = patches.get("attn1_patch", []) + [self._enter_self_attention]
            patches["attn1_output_patch"] = patches.get("attn1_output_patch", []) + [self._leave_self_attention]
        return opts

    def _chain_override(self, model_options):
        """Set the attention override, calling any existing one (ComfyUI has no helper for this option)."""
        to = model_options.setdefault("transformer_options", {})
        to["optimized_attention_override"] = self._override_chained_to(to.get("optimized_attention_override"))

    def _enter_self_attention(self, n, context, value, extra_options):
        self._in_self_attention = True
        return n, context, value

    def _leave_self_attention(self, n, extra_options):
        self._in_self_attention = False
        return n

    # ------------------------------------------------------------ per model call
    def _active_at(self, model, sigma):
        if self.start_percent <= 0.0 and self.end_percent >= 1.0:
            return True
        sampling = model.model_sampling
        high = float(sampling.percent_to_sigma(self.start_percent))
        low = float(sampling.percent_to_sigma(self.end_percent))
        s = float(sigma.max())
        return low <= s <= high

    def _latent_mask(self, height, width, device):
        key = (height, width, str(device))
        if key not in self._latent_cache:
            self._latent_cache[key] = core.latent_mask(self.mask, height, width).to(device)
        return self._latent_cache[key]

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        chunks = max(1, len(transformer_options.get("cond_or_uncond", [None])))
        latent_batch = max(1, x.shape[0] // chunks)
        core.check_mask_for_latent(self.mask, x.shape[-2], x.shape[-1], latent_batch)
        state = None
        if self.strength > 0 and self._active_at(executor.class_obj, t):
            latent_mask = self._latent_mask(x.shape[-2], x.shape[-1], x.device)
            if latent_mask.shape[0] > 1:
                if latent_mask.shape[0] * chunks != x.shape[0]:
                    raise ValueError(f"the model was called with a batch of {x.shape[0]} for {chunks} conditionings, "
                                     f"which does not split into the mask batch of {latent_mask.shape[0]}")
                latent_mask = latent_mask.repeat(chunks, 1, 1)
            text_length = c_crossattn.shape[1] if (self.kind == FLUX and c_crossattn is not None) else 0
            state = _CallState(latent_mask, text_length, (x.shape[-2], x.shape[-1], str(x.device), chunks, x.shape[0]))
        transformer_options[self.key] = state
        self._in_self_attention = False
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            transformer_options.pop(self.key, None)

    # ------------------------------------------------------------ attention
    def _token_grid(self, state, length, transformer_options):
        """``(grid, offset)`` of the image tokens in this attention's sequence, or None (not a token grid)."""
        if self.kind == UNET:
            shape = transformer_options.get("activations_shape")
            if shape is None or shape[-2] * shape[-1] != length:
                return None
            return (shape[-2], shape[-1]), 0
        grid = core.flux_image_grid(*state.latent_mask.shape[-2:])
        offset = state.text_length
        if offset + grid[0] * grid[1] > length:
            raise RuntimeError(f"FLUX attention over {length} tokens cannot hold {offset} text tokens followed by "
                               f"a {grid[0]}x{grid[1]} image grid; this model's token layout is not FLUX's")
        return grid, offset

    def _blocked(self, state, length, transformer_options):
        """Bool ``[B|1, length]`` token mask of this call (row-group form), or None when nothing is masked."""
        place = self._token_grid(state, length, transformer_options)
        if place is None:
            return None
        key = place + (length,)
        if key not in state.blocked:
            blocked = core.blocked_tokens(core.grid_mask(state.latent_mask, *place[0]), length, place[1])
            state.blocked[key] = blocked if bool(blocked.any()) else None  # None: nothing to rectify at this grid
        return state.blocked[key]

    def _split(self, state, length, transformer_options):
        """``(groups, mask batch)`` for the gathered form, computed once per latent and token grid (the only host
        synchronisation; later steps reuse it), or None when nothing is masked."""
        place = self._token_grid(state, length, transformer_options)
        if place is None:
            return None
        key = state.key + place + (length,)
        if key not in self._split_cache:
            blocked = self._blocked(state, length, transformer_options)
            groups = core.token_split(blocked) if blocked is not None else None
            self._split_cache[key] = (groups, blocked.shape[0]) if groups else None
        return self._split_cache[key]

    def _override_chained_to(self, previous):
        def override(func, *args, **kwargs):
            def backend(*a, **kw):
                return previous(func, *a, **kw) if previous is not None else func(*a, **kw)

            to = kwargs.get("transformer_options") or {}
            state = to.get(self.key)
            if state is None:
                return backend(*args, **kwargs)
            if self.kind == UNET:
                if not self._in_self_attention:
                    return backend(*args, **kwargs)  # cross-attention
                block = to.get("block")
                if self.output_blocks_only and (block is None or block[0] != "output"):
                    return backend(*args, **kwargs)
            q, k, v, heads = args[:4]
            options = dict(zip(BACKEND_OPTIONS, args[4:]), **kwargs)  # every back-end's signature after heads
            heads_first_in = options.get("skip_reshape", False)
            qh, kh, vh = (q, k, v) if heads_first_in else (core.split_heads(t, heads) for t in (q, k, v))
            length = qh.shape[2]
            if kh.shape[2] != length:
                return backend(*args, **kwargs)  # keys from elsewhere (reference tokens, ...): not SRA's self-attention
            if core.strategy_for(qh.device) == core.GATHERED_KEYS:
                split = self._split(state, length, to)
                if split is None or split[1] not in (1, qh.shape[0]):
                    return backend(*args, **kwargs)

                def dense(q_in, k_out, v_out, mask):
                    """The back-end, dense over gathered heads-first tensors; its own layout out: [b,H,n,D]."""
                    return backend(q_in, k_out, v_out, q_in.shape[1],
                                   **dict(options, mask=mask, skip_reshape=True, skip_output_reshape=True))

                return core.rectified_attention_gathered(
                    qh, kh, vh, split[0], full=lambda: backend(*args, **kwargs), dense=dense, strength=self.strength,
                    query_scale=self.query_scale, attn_mask=options.get("mask"),
                    heads_first_out=options.get("skip_output_reshape", False), head_groups=core.GATHER_HEAD_GROUPS)
            blocked = self._blocked(state, length, to)
            if blocked is None or blocked.shape[0] not in (1, qh.shape[0]):
                return backend(*args, **kwargs)  # no grid or nothing masked here, or a batch the mask was not made for

            def plain(items, rows, mask_rows):
                """The back-end on some batch items and query rows, in the caller's layout, heads-first out."""
                q_rows = core.select_rows(q[items], rows, 2 if heads_first_in else 1)
                return backend(q_rows, k[items], v[items], heads, **dict(options, mask=mask_rows, skip_output_reshape=True))

            return core.self_rectifying_attention(qh, kh, vh, blocked, plain=plain, strength=self.strength,
                                                  query_scale=self.query_scale, attn_mask=options.get("mask"),
                                                  heads_first_out=options.get("skip_output_reshape", False))
        return override


class RemovalGuider(comfy.samplers.CFGGuider):
    """CFG with Attentive Eraser's removal guidance: ``plain + scale * (redirected - plain)`` per step."""

    def set_removal(self, patch, scale, suppression_scale, suppression_steps):
        self.patch = patch
        self.removal_scale = float(scale)
        self.suppression_scale = float(suppression_scale)
        self.suppression_steps = int(suppression_steps)

    def outer_sample(self, noise, *args, **kwargs):
        core.check_mask_for_latent(self.patch.mask, noise.shape[-2], noise.shape[-1], noise.shape[0])
        return super().outer_sample(noise, *args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        plain = super().predict_noise(x, timestep, model_options, seed)
        if self.removal_scale == 0:
            return plain
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        suppress = sigmas is not None and core.suppression_active(core.step_index(timestep.max(), sigmas), self.suppression_steps)
        self.patch.query_scale = self.suppression_scale if suppress else 1.0
        comfy.model_management.throw_exception_if_processing_interrupted()
        redirected = comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                      self.conds.get("positive"), self.cfg,
                                                      model_options=self.patch.install(model_options), seed=seed)
        return core.removal_guidance(plain, redirected, self.removal_scale)


class SelfRectifyingAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitSelfRectifyingAttention",
            display_name="Self-Rectifying Attention (Erase Diffusion)",
            category=CATEGORY,
            description=("Stops the masked region from attending to itself, so an inpainting model fills the hole "
                         "from the background instead of redrawing the object (Erase Diffusion's SRA; training-"
                         "free). Works on SD1.x, SD2.x, SDXL and FLUX models (Fill and OmniEraser included), with "
                         "any attention back-end, LoRAs and other patches. Text cross-attention and FLUX text "
                         "tokens are untouched."),
            inputs=[
                io.Model.Input("model", tooltip="The inpainting model to patch (UNet or FLUX); it is cloned, not changed."),
                io.Mask.Input("mask", tooltip=MASK_TOOLTIP),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = full SRA (masked queries never see masked keys); lower values blend "
                               "the masked queries' attention back towards plain attention; 0 = off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which SRA starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which SRA stops (1 = last step)."),
                io.Combo.Input("unet_blocks", options=BLOCK_OPTIONS, default=BLOCKS_ALL, tooltip=BLOCKS_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The model with self-rectifying attention.")],
        )

    @classmethod
    def execute(cls, model, mask, strength, start_percent, end_percent, unet_blocks) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
        patch = SelfRectifyingAttention(mask, model_kind(model), strength, start_percent, end_percent, unet_blocks)
        return io.NodeOutput(patch.apply_to(model))


class RemovalGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseKitRemovalGuider",
            display_name="Attention Removal Guider (Attentive Eraser)",
            category=CATEGORY,
            description=("A GUIDER for SamplerCustomAdvanced: each step predicts once with plain attention and once "
                         "with self-rectifying attention and pushes the result away from the object: "
                         "plain + removal_scale x (redirected - plain), Attentive Eraser's self-attention "
                         "redirection guidance. removal_scale 0 is plain CFG exactly."),
            inputs=[
                io.Model.Input("model", tooltip="The inpainting model (UNet or FLUX)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (an empty prompt is usual for removal)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning; unused when cfg is 1."),
                io.Mask.Input("mask", tooltip=MASK_TOOLTIP),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance; Attentive Eraser runs without it (1). FLUX: 1."),
                io.Float.Input("removal_scale", default=core.REMOVAL_GUIDANCE_SCALE, min=0.0, max=50.0, step=0.1,
                               tooltip="Removal guidance scale (Attentive Eraser: 9). 0 = plain CFG; 1 = "
                               "the self-rectified prediction alone."),
                io.Float.Input("suppression_scale", default=core.SUPPRESSION_SCALE, min=0.0, max=1.0, step=0.01,
                               tooltip="Similarity suppression: the masked queries' attention logits are scaled "
                               "by this in the first steps (Attentive Eraser: 0.3), spreading them over the background."),
                io.Int.Input("suppression_steps", default=core.SUPPRESSION_STEPS, min=-1, max=1000,
                             tooltip="Suppression runs while the 0-based step index is at most this (official "
                             "cur_step <= ss_steps, 9); -1 = never."),
                io.Combo.Input("unet_blocks", options=BLOCK_OPTIONS, default=BLOCKS_OUTPUT, tooltip=BLOCKS_TOOLTIP),
            ],
            outputs=[io.Guider.Output(tooltip="Guider for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, mask, cfg, removal_scale, suppression_scale, suppression_steps,
                unet_blocks) -> io.NodeOutput:
        patch = SelfRectifyingAttention(mask, model_kind(model), blocks=unet_blocks)
        guider = RemovalGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        guider.set_removal(patch, removal_scale, suppression_scale, suppression_steps)
        return io.NodeOutput(guider)


NODES = [SelfRectifyingAttentionNode, RemovalGuiderNode]
