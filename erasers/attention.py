"""Erase Diffusion's self-rectifying attention (SRA) and Attentive Eraser's removal guidance, in plain torch.

SRA (the Erase Diffusion paper, CVPR 2025, "self-rectifying attention") replaces every self-attention: with the
object mask m at the layer's token grid, the additive mask is m'_ij = -inf when m_i = 1 and m_j = 1, else 0. A query
inside the mask may not attend to any key inside the mask (itself included), so the hole is filled from the
background; queries outside the mask are untouched.

Neither form builds an L x L mask. The strategy is picked per device (``strategy_for``):

- ``ROW_GROUPS`` (CPU, ``self_rectifying_attention``): every query is computed once. The queries outside the mask get
  plain attention from the caller's back-end, the inside queries attend with one boolean key row ``[1, 1, 1, L]``
  (SDPA). Queries go in groups of at most ``QUERY_CHUNK``, the size the CPU flash kernel runs fastest, so the extra
  memory is one group's queries and output.
- ``GATHERED_KEYS`` (CUDA and other accelerators, ``rectified_attention_gathered``): a query inside the mask may see
  exactly the keys outside it, so its attention is a *dense* attention over the gathered outside keys and values:
  no mask tensor, flash-eligible. One back-end call over all queries gives the outside rows (bit-identical to the
  unpatched call, FLUX text included); one dense call computes the inside rows, which are written over their plain
  rows. Per attention that is two kernels plus three gathers and a scatter, with no host synchronisation: the token
  indices are computed once per token grid (``token_split``). Chosen over partitioning the queries (outside queries
  alone, then inside ones): that saves the inside rows' share of the full call (f L^2 of L^2 FLOPs for a fraction f
  masked) but adds a gather of the outside queries and a scatter of their output (two passes over ~(1 - f) of the
  activations) and a third kernel, and its outside rows would no longer be the back-end's own output. Also rejected:
  the inside rows over all keys with a key mask (no gathered keys, but f L^2 FLOPs in the slower masked kernel, not
  flash), and removing the inside keys' share from the full call's output with its log-sum-exp (cheap, but it
  cancels catastrophically exactly where SRA matters: masked queries that attend mostly to masked keys). Extra FLOPs:
  f (1 - f) L^2; extra memory: the gathered outside keys and values, about twice one input's size, below what the
  block's MLP activations already need (``head_groups`` bounds it further by processing the heads in groups).

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import layout

# Attentive Eraser defaults (official main.py / pipeline).
REMOVAL_GUIDANCE_SCALE = 9.0
SUPPRESSION_SCALE = 0.3
SUPPRESSION_STEPS = 9
FLUX_PATCH = 2
# Queries per attention call. CPU flash attention runs 768+ queries in 256-row blocks (fewer run in 64- or
# 32-row blocks, 12-25 % slower per query); one group's gathered queries and output stay under 10 % of the plain
# call's memory at SD1.5 512 (benchmarks/attention.py).
QUERY_CHUNK = 768
ROW_GROUPS = "row_groups"
GATHERED_KEYS = "gathered_keys"
# The row-group form is tuned to the CPU's SDPA kernel; every other device type (cuda, xpu, mps, ...) gets the dense
# gathered form. Tests point "cpu" at GATHERED_KEYS to exercise that path on CPU tensors.
STRATEGY_BY_DEVICE_TYPE = {"cpu": ROW_GROUPS}
# Dense calls per attention in the gathered form, each over a share of the heads. 1: one call, the fewest kernels;
# n bounds the gathered outside keys/values to 1/n of the heads (about 2/n of one input's size instead of 2x).
# benchmarks/attention.py --head-groups measures the trade.
GATHER_HEAD_GROUPS = 1


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
    """Bool ``[B,h,w]`` at latent resolution: binarised (``layout.binarize``), a latent pixel is inside if any of
    its pixels is."""
    return layout.latent_mask(mask, latent_height, latent_width, cover="any").squeeze(1) > 0


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


def attention_mask_rows(attn_mask, items, rows):
    """The caller's attention mask (``[L,L]``, ``[B,L,L]`` or ``[B,H|1,L,L]``) for some batch items and query rows.

    Keeps the caller's number of dimensions, so any attention back-end takes it as it took the whole mask.
    """
    if attn_mask is None:
        return None
    m = attn_mask
    if m.ndim > 2 and m.shape[0] > 1:
        m = m[items]
    return select_rows(m, rows, m.ndim - 2)


def select_rows(x, rows, dim):
    """Token rows of ``x`` along ``dim``: a view for a slice, a gather for an index tensor."""
    if isinstance(rows, slice):
        return x.narrow(dim, rows.start, rows.stop - rows.start)
    return x.index_select(dim, rows)


def sdpa_rows(q, k, v):
    """The default plain back-end for ``self_rectifying_attention``: SDPA of some query rows, ``[b,H,n,D]``."""
    def plain(items, rows, mask_rows):
        return F.scaled_dot_product_attention(select_rows(q[items], rows, 2), k[items], v[items],
                                              attn_mask=_sdpa_mask(mask_rows))
    return plain


def _sdpa_mask(mask):
    if mask is not None and mask.ndim == 2:
        return mask.unsqueeze(0)
    if mask is not None and mask.ndim == 3:
        return mask.unsqueeze(1)
    return mask


def query_chunks(rows, chunk):
    """Split sorted token indices into groups of at most ``chunk``: a slice where a group is contiguous (no
    gather needed), else the index tensor."""
    for start in range(0, rows.numel(), chunk):
        group = rows[start:start + chunk]
        first, last = int(group[0]), int(group[-1])
        yield slice(first, last + 1) if last - first + 1 == group.numel() else group


def _inside_attention(q_inside, k, v, allowed_keys, query_scale, mask_rows):
    """Attention of the inside queries ``[b,H,n,D]`` over the allowed keys only (one ``[1,1,1,L]`` bool row);
    ``mask_rows`` is the caller's mask for these rows in SDPA's 4-D form, or None."""
    mask = allowed_keys.view(1, 1, 1, -1)
    if mask_rows is not None:
        if mask_rows.dtype == torch.bool:
            mask = mask_rows & mask
        else:
            mask = mask_rows.masked_fill(~mask, float("-inf"))
    scale = query_scale / math.sqrt(q_inside.shape[-1])
    return F.scaled_dot_product_attention(q_inside, k, v, attn_mask=mask, scale=scale)


def self_rectifying_attention(q, k, v, blocked, plain=None, strength=1.0, query_scale=1.0, attn_mask=None,
                              heads_first_out=False, query_chunk=None):
    """SRA over ``[B,H,L,D]`` queries/keys/values; ``blocked`` bool ``[B|1, L]`` marks tokens inside the mask.

    Returns ``[B, L, H*D]`` (``[B,H,L,D]`` with ``heads_first_out``). ``plain(items, rows, mask_rows)`` is the
    caller's attention back-end for batch items ``items`` (a slice) and query rows ``rows`` (a slice or index
    tensor), returning ``[b,H,n,D]``; SDPA when None. Queries not blocked get exactly that plain attention.
    Blocked queries attend to unblocked keys only, with logits scaled by ``query_scale``, blended ``strength`` of
    the way from plain. An item whose tokens are all blocked has no allowed key and keeps plain attention (never
    NaN); so do blocked rows that the caller's ``attn_mask`` leaves without an allowed key.

    Every query is computed once: plain for the outside ones, rectified for the inside ones (``strength`` < 1 adds
    plain for the inside ones), in groups of at most ``query_chunk`` (default ``QUERY_CHUNK``) queries, so the
    extra memory is one group's gathered queries and output.
    """
    batch, heads, length, dim = q.shape
    query_chunk = query_chunk or QUERY_CHUNK
    plain = plain or sdpa_rows(q, k, v)
    out = None
    out_rows = None  # [B, L, H, D] view of ``out``

    def write(items, rows, part):  # part: [b, H, n, D]
        nonlocal out, out_rows
        if out is None:
            shape = (batch, heads, length, dim) if heads_first_out else (batch, length, heads * dim)
            out = part.new_empty(shape)
            out_rows = out.transpose(1, 2) if heads_first_out else out.view(batch, length, heads, dim)
        target, part = out_rows[items], part.transpose(1, 2).to(out.dtype)
        if isinstance(rows, slice):
            target[:, rows] = part
        else:
            target.index_copy_(1, rows, part)

    shared = blocked.shape[0] == 1 or bool((blocked == blocked[:1]).all())
    for items in [slice(None)] if shared else [slice(i, i + 1) for i in range(batch)]:
        row = blocked[0] if shared else blocked[items.start]
        inside = row.nonzero().squeeze(1)
        if inside.numel() in (0, length) or strength == 0:
            inside = inside[:0]  # nothing blocked, or no key left, or SRA off: plain attention for every query
            row = torch.zeros_like(row)
        for rows in query_chunks((~row).nonzero().squeeze(1), query_chunk):
            write(items, rows, plain(items, rows, attention_mask_rows(attn_mask, items, rows)))
        for rows in query_chunks(inside, query_chunk):
            mask_rows = attention_mask_rows(attn_mask, items, rows)
            sdpa_mask = _sdpa_mask(mask_rows)
            redirected = _inside_attention(select_rows(q[items], rows, 2), k[items], v[items], ~row, query_scale,
                                           sdpa_mask)
            keep_plain = None
            if sdpa_mask is not None:  # rows whose own mask leaves no allowed key keep plain attention
                allowed = ~row.view(1, 1, 1, -1) & (sdpa_mask if sdpa_mask.dtype == torch.bool else sdpa_mask > float("-inf"))
                keep_plain = ~allowed.any(-1, keepdim=True)
                keep_plain = keep_plain if bool(keep_plain.any()) else None
            if strength != 1 or keep_plain is not None:
                plain_rows = plain(items, rows, mask_rows).to(redirected.dtype)
                if keep_plain is not None:
                    redirected = torch.where(keep_plain, plain_rows, redirected)
                if strength != 1:
                    redirected = torch.lerp(plain_rows, redirected, strength)
                del plain_rows
            write(items, rows, redirected)
    return out


def strategy_for(device):
    """``ROW_GROUPS`` or ``GATHERED_KEYS`` for tensors on ``device`` (see the module docstring)."""
    return STRATEGY_BY_DEVICE_TYPE.get(torch.device(device).type, GATHERED_KEYS)


@dataclass(frozen=True)
class SplitGroup:
    """Batch items that share one token mask, and that mask's inside and outside token indices."""

    items: slice | torch.Tensor  # a slice (a view of the batch) or the item indices
    inside: torch.Tensor
    outside: torch.Tensor


def token_split(blocked):
    """The ``SplitGroup`` list of a bool ``[B|1, L]`` token mask: one group per distinct row that has tokens both
    inside and outside (an empty row needs nothing, a fully covered one keeps plain attention).

    It synchronises with the device (index sizes are data), so callers compute it once per token grid and reuse it.
    """
    if blocked.shape[0] == 1:
        rows, inverse = blocked, None
    else:
        rows, inverse = torch.unique(blocked, dim=0, return_inverse=True)
    length = blocked.shape[1]
    groups = []
    for u in range(rows.shape[0]):
        inside = rows[u].nonzero().squeeze(1)
        if inside.numel() in (0, length):
            continue
        items = slice(None)
        if inverse is not None and rows.shape[0] > 1:
            members = (inverse == u).nonzero().squeeze(1)
            first, last = int(members[0]), int(members[-1])
            items = slice(first, last + 1) if last - first + 1 == members.numel() else members
        groups.append(SplitGroup(items, inside, (~rows[u]).nonzero().squeeze(1)))
    return groups


def gather_tokens(x, items, rows):
    """``x[items][:, :, rows]`` of a ``[B,H,L,D]`` tensor as ``[b,H,n,D]``, in one gather."""
    if isinstance(items, slice):
        return x[items][:, :, rows]
    return x[items[:, None], :, rows].transpose(1, 2)  # advanced indices first: [b, n, H, D]


def scatter_tokens(target, items, rows, part):
    """Write ``part`` ``[b,H,n,D]`` into the token rows ``rows`` of ``target`` ``[B,L,H,D]`` (a view of the output)."""
    if isinstance(items, slice):
        target[items][:, rows] = part.transpose(1, 2)
    else:
        target[items[:, None], rows] = part.transpose(1, 2)


def sdpa_dense(q, k, v, mask=None):
    """The default dense back-end of ``rectified_attention_gathered``: SDPA of ``[b,H,n,D]`` tensors."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _mask_block(attn_mask, items, inside, outside):
    """The caller's mask (``[L,L]``, ``[B,L,L]`` or ``[B,H|1,L,L]``) for some items, inside rows and outside keys, in
    SDPA's 4-D form."""
    m = attn_mask[None, None] if attn_mask.ndim == 2 else _sdpa_mask(attn_mask)  # [B|1, H|1, L, L]
    if m.shape[0] > 1:
        m = m[items]
    return m.index_select(-2, inside).index_select(-1, outside)


def rectified_attention_gathered(q, k, v, groups, full=None, dense=None, strength=1.0, query_scale=1.0,
                                 attn_mask=None, heads_first_out=False, head_groups=1):
    """SRA as one plain call over all queries plus one dense call per ``SplitGroup`` (``GATHERED_KEYS``).

    ``q, k, v``: ``[B,H,L,D]``. ``groups``: ``token_split`` of the token mask. ``full()``: the caller's plain attention
    of every query, ``[B, L, H*D]`` (``[B,H,L,D]`` with ``heads_first_out``); SDPA when None. Its rows outside the
    mask are returned as they are. ``dense(q, k, v, mask)``: attention of ``[b,H,n,D]`` tensors (SDPA when None); it
    computes the inside queries over the gathered outside keys and values, and its rows replace theirs in ``full``'s
    output. ``query_scale`` scales the inside queries' logits (folded into the gathered queries); ``strength`` < 1
    blends from plain; rows the caller's ``attn_mask`` leaves without an outside key keep plain. ``head_groups``: dense
    calls per group of items, each over a share of the heads, which bounds the gathered keys and values to it.
    """
    batch, heads, length, dim = q.shape
    if full is None:
        out = plain_attention(q, k, v, _sdpa_mask(attn_mask))
        out = out.view(batch, length, heads, dim).transpose(1, 2) if heads_first_out else out
    else:
        out = full()
    if not groups or strength == 0:
        return out
    dense = dense or sdpa_dense
    if not heads_first_out:
        out = out.contiguous()  # a no-op for every ComfyUI back-end; the scatter below must write into ``out`` itself
    rows_out = out.transpose(1, 2) if heads_first_out else out.view(batch, length, heads, dim)  # [B, L, H, D] view
    head_chunk = -(-heads // max(1, head_groups))
    for group in groups:
        items, inside, outside = group.items, group.inside, group.outside
        mask = None if attn_mask is None else _mask_block(attn_mask, items, inside, outside)
        for h in range(0, heads, head_chunk):
            hs = slice(h, min(h + head_chunk, heads))
            q_in = gather_tokens(q[:, hs], items, inside)
            if query_scale != 1:
                q_in = q_in.mul_(query_scale)  # our own gathered copy: softmax(s q k^T / sqrt(d))
            mask_h = mask if mask is None or mask.shape[1] == 1 else mask[:, hs]
            redirected = dense(q_in, gather_tokens(k[:, hs], items, outside), gather_tokens(v[:, hs], items, outside),
                               mask_h)
            del q_in
            if strength != 1 or mask is not None:
                plain_rows = gather_tokens(rows_out[:, :, hs].transpose(1, 2), items, inside).to(redirected.dtype)
                if mask is not None:  # rows whose own mask allows no outside key keep plain attention
                    allowed = mask_h if mask_h.dtype == torch.bool else mask_h > float("-inf")
                    redirected = torch.where(allowed.any(-1, keepdim=True), redirected, plain_rows)
                if strength != 1:
                    redirected = torch.lerp(plain_rows, redirected, strength)
            scatter_tokens(rows_out[:, :, hs], items, inside, redirected.to(out.dtype))
    return out


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
