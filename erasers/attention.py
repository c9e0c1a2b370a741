"""Erase Diffusion's self-rectifying attention (SRA) and Attentive Eraser's removal guidance, in plain torch.

SRA (../shared/METHODS.md section 2) replaces every self-attention: with the object mask m at the layer's
token grid, the additive mask is m'_ij = -inf when m_i = 1 and m_j = 1, else 0. A query inside the mask may
not attend to any key inside the mask (itself included), so the hole is filled from the background; queries
outside the mask are untouched.

The fast form never builds an L x L mask: every query first gets plain attention (the caller's back-end, so
outside queries are bit-for-bit unchanged), then only the inside queries are gathered and attend again with one
boolean key row ``[1, 1, 1, L]`` that broadcasts over batch, heads and queries (SDPA), and are scattered back.
Extra work is ``|inside| x L``; extra memory is the gathered inside queries and their output.

Token layouts handled here:
- UNet levels: the latent mask is max-pooled by 2 with ceil sizing per level, exactly how the UNet's stride-2,
  pad-1 downsampling sizes odd grids (5 -> 3 -> 2 -> 1).
- FLUX: image tokens are 2 x 2 patches of the latent padded to even size (ComfyUI's ``pad_to_patch_size``),
  so the token mask is one ceil max-pool; text tokens before them are never blocked.

Masks are binarised at 0.5 and downsampled by "any coverage" (max-pool), as Attentive Eraser's
``F.max_pool2d(mask, ...).round()``: a token touching the object is inside.

Removal guidance (Attentive Eraser's self-attention redirection guidance, pipeline
``pipeline_stable_diffusion_xl_attentive_eraser.py``): ``pred = plain + scale * (redirected - plain)``, scale 9,
and for the first steps (official ``cur_step <= ss_steps``, ss_steps 9) the inside queries' logits are scaled by
0.3 ("similarity suppression"). Its default layers 34-70 of SDXL's 70 transformer blocks are the decoder
(output) blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Attentive Eraser defaults (official main.py / pipeline; METHODS.md section 2).
REMOVAL_GUIDANCE_SCALE = 9.0
SUPPRESSION_SCALE = 0.3
SUPPRESSION_STEPS = 9
FLUX_PATCH = 2


# --------------------------------------------------------------------------------------------------------------
# Masks at token grids


def check_mask_for_latent(mask, latent_height, latent_width, latent_batch):
    """Validate a MASK ``[B,H,W]`` (or ``[H,W]``) against a latent; return it as ``[B,H,W]``.

    The batch must be 1 or the latent batch; the aspect must match the latent's within one latent pixel each
    way (VAE encoders floor the image to a multiple of 8). Raises ValueError naming both otherwise.
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"mask must be [batch, height, width], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, latent_batch):
        raise ValueError(f"mask batch of {mask.shape[0]} does not match the latent batch of {latent_batch}; "
                         "use a batch of 1 or one mask per latent")
    mask_h, mask_w = mask.shape[-2:]
    ratio = (mask_h / mask_w) / (latent_height / latent_width)
    slack = (1 + 1 / latent_height) * (1 + 1 / latent_width)
    if not 1 / slack <= ratio <= slack:
        raise ValueError(f"mask is {mask_w}x{mask_h} (width x height) but the latent is {latent_width}x{latent_height} "
                         f"(image about {latent_width * 8}x{latent_height * 8}): their aspect ratios differ; "
                         "use the mask of the image that was encoded")
    return mask


def latent_mask(mask, latent_height, latent_width):
    """Bool ``[B,h,w]`` at latent resolution: binarised at 0.5, a latent pixel is inside if any pixel is."""
    binary = (mask >= 0.5).to(torch.float32).unsqueeze(1)
    return F.adaptive_max_pool2d(binary, (latent_height, latent_width)).squeeze(1) > 0


def grid_mask(mask, height, width):
    """Bool ``[B,height,width]`` of a bool ``[B,H,W]`` mask at a coarser token grid.

    Grids reached by halving with ceil sizing (UNet levels, FLUX 2x2 patches) are pooled level by level, so
    each token covers exactly the latent pixels the model merged into it; any other grid falls back to an
    adaptive max-pool.
    """
    current = mask.to(torch.float32).unsqueeze(1)
    while tuple(current.shape[-2:]) != (height, width):
        h, w = current.shape[-2:]
        if h < height or w < width or (h == 1 and w == 1):
            return F.adaptive_max_pool2d(mask.to(torch.float32).unsqueeze(1), (height, width)).squeeze(1) > 0
        current = F.max_pool2d(current, 2, 2, ceil_mode=True)
    return current.squeeze(1) > 0


def flux_image_grid(latent_height, latent_width, patch=FLUX_PATCH):
    """FLUX's image token grid for a latent (padded to the patch size, as ``pad_to_patch_size``)."""
    return math.ceil(latent_height / patch), math.ceil(latent_width / patch)


def blocked_tokens(token_mask, sequence_length, offset=0):
    """Bool ``[B, sequence_length]``: the flattened grid mask placed at ``offset`` (FLUX: after the text)."""
    flat = token_mask.flatten(1)
    if offset + flat.shape[1] > sequence_length:
        raise ValueError(f"a {tuple(token_mask.shape[1:])} token grid at offset {offset} does not fit a sequence "
                         f"of {sequence_length} tokens")
    if offset == 0 and flat.shape[1] == sequence_length:
        return flat
    blocked = torch.zeros(flat.shape[0], sequence_length, dtype=torch.bool, device=flat.device)
    blocked[:, offset:offset + flat.shape[1]] = flat
    return blocked


# --------------------------------------------------------------------------------------------------------------
# Attention


def split_heads(x, heads):
    """``[B, L, H*D]`` -> ``[B, H, L, D]`` view (no copy)."""
    b, length, inner = x.shape
    return x.view(b, length, heads, inner // heads).transpose(1, 2)


def plain_attention(q, k, v, attn_mask=None):
    """Plain attention of ``[B,H,L,D]`` tensors as ``[B, L, H*D]`` (the reference for the plain part)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _inside_attention(q_inside, k, v, allowed_keys, query_scale, attn_mask_rows):
    """Attention of the gathered inside queries ``[B,H,n,D]`` over the allowed keys only."""
    mask = allowed_keys.view(1, 1, 1, -1)
    if attn_mask_rows is not None:
        if attn_mask_rows.dtype == torch.bool:
            mask = attn_mask_rows & mask
        else:
            mask = attn_mask_rows.masked_fill(~mask, float("-inf"))
    scale = query_scale / math.sqrt(q_inside.shape[-1])
    return F.scaled_dot_product_attention(q_inside, k, v, attn_mask=mask, scale=scale)


def _attn_mask_rows(attn_mask, item, rows):
    """The caller's own attention mask (``[L,L]``, ``[B,L,L]`` or ``[B,H|1,L,L]``) for some query rows."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if item is not None and m.shape[0] > 1:
        m = m[item:item + 1]
    return m.index_select(2, rows)


def self_rectifying_attention(q, k, v, blocked, plain_out=None, strength=1.0, query_scale=1.0, attn_mask=None,
                              heads_first_out=False):
    """SRA over ``[B,H,L,D]`` queries/keys/values; ``blocked`` bool ``[B|1, L]`` marks tokens inside the mask.

    Queries not blocked keep ``plain_out`` (the caller's plain attention, ``[B, L, H*D]`` or, with
    ``heads_first_out``, ``[B,H,L,D]``; computed with SDPA when None). Blocked queries attend to unblocked keys
    only, with logits scaled by ``query_scale``, blended ``strength`` of the way from plain. When every token is
    blocked no key is allowed: those queries keep plain attention (never NaN). ``plain_out`` is updated in
    place and returned.
    """
    batch, heads, length, dim = q.shape
    if plain_out is None:
        plain_out = plain_attention(q, k, v, attn_mask)
        heads_first_out = False
    if strength == 0 or not bool(blocked.any()):
        return plain_out
    # [B, L, H, D] view of the output so that token rows can be overwritten in either layout.
    if not heads_first_out:
        plain_out = plain_out.contiguous()  # a no-op for every ComfyUI back-end; needed for the view
    rows_out = plain_out.transpose(1, 2) if heads_first_out else plain_out.view(batch, length, heads, dim)
    shared = blocked.shape[0] == 1 or bool((blocked == blocked[:1]).all())
    items = [None] if shared else range(batch)
    for item in items:
        row = blocked[0] if item is None else blocked[item]
        inside = row.nonzero().squeeze(1)
        if inside.numel() in (0, length):
            continue  # nothing blocked, or no key left: plain attention for this item
        sl = slice(None) if item is None else slice(item, item + 1)
        q_inside = q[sl].index_select(2, inside)
        mask_rows = _attn_mask_rows(attn_mask, item, inside)
        redirected = _inside_attention(q_inside, k[sl], v[sl], ~row, query_scale, mask_rows)
        del q_inside
        if mask_rows is not None:
            # rows whose own mask leaves no allowed key keep plain attention
            allowed = ~row.view(1, 1, 1, -1) & (mask_rows if mask_rows.dtype == torch.bool else mask_rows > float("-inf"))
            empty = ~allowed.any(-1, keepdim=True)
            if bool(empty.any()):
                plain_rows = rows_out[sl].index_select(1, inside).transpose(1, 2).to(redirected.dtype)
                redirected = torch.where(empty, plain_rows, redirected)
        redirected = redirected.transpose(1, 2).to(rows_out.dtype)  # [b, n, H, D]
        target = rows_out[sl]
        if strength != 1:
            redirected = torch.lerp(target.index_select(1, inside), redirected, strength)
        target.index_copy_(1, inside, redirected)
    return plain_out


def sra_probabilities(q, k, blocked, query_scale=1.0):
    """Explicit attention probabilities ``[B,H,L,L]`` with SRA's rule (reference for tests and inspection)."""
    scale = 1 / math.sqrt(q.shape[-1])
    logits = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale
    inside = blocked[:, None, :, None]
    forbidden = inside & blocked[:, None, None, :]
    all_blocked = blocked.all(-1)[:, None, None, None]
    forbidden = forbidden & ~all_blocked
    logits = torch.where(inside & ~all_blocked, logits * query_scale, logits)
    return logits.masked_fill(forbidden, float("-inf")).softmax(-1)


# --------------------------------------------------------------------------------------------------------------
# Guidance


def removal_guidance(plain, redirected, scale):
    """Attentive Eraser's form: ``plain + scale * (redirected - plain)``; scale 0 returns ``plain`` itself."""
    if scale == 0:
        return plain
    return plain + (redirected - plain) * scale


def suppression_active(step_index, suppression_steps=SUPPRESSION_STEPS):
    """Similarity suppression runs while ``step_index <= suppression_steps`` (official ``cur_step <= ss_steps``)."""
    return step_index <= suppression_steps


def step_index(sigma, sample_sigmas):
    """0-based index of the sampling step evaluating ``sigma`` (step i runs from ``sigmas[i]`` towards ``sigmas[i+1]``)."""
    s = float(sigma) * (1 - 1e-5)
    return sum(1 for later in sample_sigmas[1:] if float(later) >= s)
