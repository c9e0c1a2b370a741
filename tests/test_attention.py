"""Self-rectifying attention core: token-grid masks, the fast masked attention, removal guidance."""
import math

import pytest
import torch

from erasekit.erasers import attention as sra
from erasekit.train.loop import native_bf16


def _qkv(batch=2, heads=3, length=30, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g) for _ in range(3)]


def _reference(q, k, v, blocked, query_scale=1.0):
    probs = sra.sra_probabilities(q, k, blocked.expand(q.shape[0], -1), query_scale)
    out = torch.einsum("bhij,bhjd->bhid", probs, v.float())
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


# ------------------------------------------------------------------ grids

def _unet_level_sizes(h, w, levels):
    """Sizes a stride-2, pad-1 conv (the UNet's Downsample) really produces."""
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, h, w)
    sizes = [(h, w)]
    for _ in range(levels):
        x = conv(x)
        sizes.append(tuple(x.shape[-2:]))
    return sizes


@pytest.mark.parametrize("h,w", [(13, 9), (64, 64), (7, 11), (5, 1)])
def test_grid_mask_matches_unet_downsampling_and_covers_any_touching_pixel(h, w):
    g = torch.Generator().manual_seed(h * w)
    mask = torch.rand(1, h, w, generator=g) > 0.8
    for level, (gh, gw) in enumerate(_unet_level_sizes(h, w, 4)):
        got = sra.grid_mask(mask, gh, gw)
        assert got.shape == (1, gh, gw)
        s = 2 ** level
        for i in range(gh):
            for j in range(gw):
                want = bool(mask[0, i * s:(i + 1) * s, j * s:(j + 1) * s].any())
                assert bool(got[0, i, j]) == want, (level, i, j)


def test_flux_grid_pads_odd_latents_like_pad_to_patch_size():
    assert sra.flux_image_grid(13, 9) == (7, 5)
    mask = torch.zeros(1, 13, 9, dtype=torch.bool)
    mask[0, 12, 8] = True  # the last, unpaired latent pixel belongs to the last token
    tokens = sra.grid_mask(mask, 7, 5)
    assert tokens.flatten().nonzero().flatten().tolist() == [7 * 5 - 1]


def test_latent_mask_binarises_and_keeps_partial_coverage():
    mask = torch.zeros(1, 64, 48)
    mask[0, 10, 10] = 0.6   # one pixel above 0.5 -> its latent pixel is inside
    mask[0, 40, 40] = 0.4   # below 0.5 -> ignored
    lat = sra.latent_mask(mask, 8, 6)
    assert lat.shape == (1, 8, 6)
    assert lat.sum() == 1 and bool(lat[0, 1, 1])


def test_blocked_tokens_leave_text_tokens_free():
    grid = torch.ones(1, 2, 3, dtype=torch.bool)
    blocked = sra.blocked_tokens(grid, 10, offset=4)
    assert blocked.tolist() == [[False] * 4 + [True] * 6]
    with pytest.raises(ValueError, match="does not fit"):
        sra.blocked_tokens(grid, 9, offset=4)


def test_check_mask_for_latent_errors():
    ok = sra.check_mask_for_latent(torch.zeros(512, 512), 64, 64, 2)
    assert ok.shape == (1, 512, 512)
    sra.check_mask_for_latent(torch.zeros(2, 517, 771), 64, 96, 2)  # floor to multiples of 8 is fine
    with pytest.raises(ValueError, match="mask batch of 3 does not match the latent batch of 2"):
        sra.check_mask_for_latent(torch.zeros(3, 512, 512), 64, 64, 2)
    with pytest.raises(ValueError, match="aspect ratios differ"):
        sra.check_mask_for_latent(torch.zeros(1, 512, 768), 64, 64, 1)


# ------------------------------------------------------------------ attention

@pytest.mark.parametrize("per_item", [False, True])
@pytest.mark.parametrize("query_scale", [1.0, 0.3])
def test_sra_equals_the_explicit_softmax_rule(per_item, query_scale):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    blocked = torch.rand(2 if per_item else 1, 30, generator=g) > 0.6
    out = sra.self_rectifying_attention(q, k, v, blocked, query_scale=query_scale)
    torch.testing.assert_close(out, _reference(q, k, v, blocked, query_scale), atol=1e-5, rtol=1e-5)


def test_masked_queries_give_exactly_zero_weight_to_masked_keys():
    q, k, v = _qkv()
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 5:17] = True
    probs = sra.sra_probabilities(q, k, blocked.expand(2, -1))
    assert torch.equal(probs[:, :, 5:17, 5:17], torch.zeros_like(probs[:, :, 5:17, 5:17]))
    assert (probs[:, :, :5, 5:17] > 0).all()  # outside queries still see the object
    # The fast path: huge values at the masked keys do not move the masked queries by one bit.
    v_poisoned = v.clone()
    v_poisoned[:, :, 5:17] = 1e30
    a = sra.self_rectifying_attention(q, k, v, blocked).view(2, 30, 3, 8)
    b = sra.self_rectifying_attention(q, k, v_poisoned, blocked).view(2, 30, 3, 8)
    assert torch.equal(a[:, 5:17], b[:, 5:17])


class RecordingBackend:
    """A plain back-end that records the query rows it is asked for (each query must be computed once)."""

    def __init__(self, q, k, v):
        self.sdpa = sra.sdpa_rows(q, k, v)
        self.calls = []

    def __call__(self, items, rows, mask_rows):
        out = self.sdpa(items, rows, mask_rows)
        self.calls.append((items, rows, out))
        return out

    def rows(self):
        return sorted(i for _, rows, _ in self.calls for i in self.indices(rows))

    @staticmethod
    def indices(rows):
        return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()


@pytest.mark.parametrize("chunk", [4, 7, 768])
def test_outside_queries_get_the_plain_back_end_once_and_inside_queries_never(chunk):
    q, k, v = _qkv()
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 3:9] = True
    blocked[0, 20:23] = True
    backend = RecordingBackend(q, k, v)
    out = sra.self_rectifying_attention(q, k, v, blocked, plain=backend, query_chunk=chunk)
    outside = (~blocked[0]).nonzero().squeeze(1).tolist()
    assert backend.rows() == outside  # each outside query once, no inside query
    assert max(part.shape[2] for *_, part in backend.calls) <= chunk
    for items, rows, part in backend.calls:  # outside queries hold exactly what the back-end returned
        assert torch.equal(out.view(2, 30, 3, 8)[items][:, backend.indices(rows)], part.transpose(1, 2))
    if chunk == 768:  # one gathered call, as the whole call would have run it
        assert len(backend.calls) == 1
    torch.testing.assert_close(out, _reference(q, k, v, blocked), atol=1e-5, rtol=1e-5)
    keep = ~blocked[0]
    torch.testing.assert_close(out[:, keep], sra.plain_attention(q, k, v)[:, keep], atol=1e-6, rtol=1e-6)


def test_query_chunks_are_slices_where_contiguous():
    rows = torch.tensor([0, 1, 2, 3, 5, 6, 9, 10, 11])
    groups = list(sra.query_chunks(rows, 4))
    assert groups[0] == slice(0, 4)
    assert torch.equal(groups[1], torch.tensor([5, 6, 9, 10]))
    assert groups[2] == slice(11, 12)
    assert list(sra.query_chunks(rows[:0], 4)) == []


def test_heads_first_output_layout():
    q, k, v = _qkv()
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 3:9] = True
    out = sra.self_rectifying_attention(q, k, v, blocked, heads_first_out=True)
    assert out.shape == q.shape
    torch.testing.assert_close(out.transpose(1, 2).reshape(2, 30, -1), _reference(q, k, v, blocked), atol=1e-5, rtol=1e-5)


def test_full_mask_falls_back_to_plain_and_empty_mask_is_plain():
    q, k, v = _qkv()
    plain = sra.plain_attention(q, k, v)
    full = sra.self_rectifying_attention(q, k, v, torch.ones(1, 30, dtype=torch.bool))
    assert torch.equal(full, plain) and not full.isnan().any()
    per_item = torch.zeros(2, 30, dtype=torch.bool)
    per_item[0] = True  # item 0 fully covered, item 1 partly
    per_item[1, :4] = True
    out = sra.self_rectifying_attention(q, k, v, per_item)
    assert torch.equal(out[0], plain[0]) and not out.isnan().any()
    torch.testing.assert_close(out[1:], _reference(q[1:], k[1:], v[1:], per_item[1:]), atol=1e-5, rtol=1e-5)
    empty = torch.zeros(1, 30, dtype=torch.bool)
    assert torch.equal(sra.self_rectifying_attention(q, k, v, empty), plain)


def test_strength_blends_towards_plain():
    q, k, v = _qkv()
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 10:20] = True
    plain = sra.plain_attention(q, k, v)
    full = _reference(q, k, v, blocked)
    half = sra.self_rectifying_attention(q, k, v, blocked, strength=0.5)
    torch.testing.assert_close(half, 0.5 * plain + 0.5 * full, atol=1e-5, rtol=1e-5)
    assert torch.equal(sra.self_rectifying_attention(q, k, v, blocked, strength=0.0), plain)


def _callers_mask_case(pad_ndim):
    """Tokens 20.. blocked; a caller's boolean mask in which keys 25.. are padding for everyone and query 22 may only
    see keys 20..24, all blocked (so it keeps plain attention); the mask as given with ``pad_ndim`` dimensions."""
    q, k, v = _qkv(batch=1)
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 20:] = True
    pad = torch.ones(1, 1, 30, 30, dtype=torch.bool)
    pad[..., 25:] = False
    pad[:, :, 22, :20] = False
    given = pad.reshape(pad.shape[-(pad_ndim):]) if pad_ndim < 4 else pad
    return q, k, v, blocked, pad, given


def _assert_callers_mask_respected(out, plain, q, k, v, pad):
    """``out`` of ``_callers_mask_case``: query 22 (no unblocked key) keeps plain attention, every other query
    follows the caller's mask with tokens 20.. unable to see each other."""
    assert not out.isnan().any()
    torch.testing.assert_close(out[:, 22], plain[:, 22], atol=1e-6, rtol=1e-6)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8)
    rule = pad.clone()
    rule[:, :, 20:, 20:] = False
    rule[:, :, 22] = pad[:, :, 22]
    want = logits.masked_fill(~rule, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(1, 30, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad_ndim", [2, 3, 4])
def test_callers_padding_mask_is_respected_and_rows_without_keys_stay_plain(pad_ndim):
    q, k, v, blocked, pad, given = _callers_mask_case(pad_ndim)
    plain = sra.plain_attention(q, k, v, pad)
    out = sra.self_rectifying_attention(q, k, v, blocked, attn_mask=given, query_chunk=4)
    _assert_callers_mask_respected(out, plain, q, k, v, pad)


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU emulates bf16 (no AVX-512-BF16/AMX); tests never compute "
                    "in emulated bf16")
def test_half_precision_runs_and_matches():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 10:20] = True
    out = sra.self_rectifying_attention(q, k, v, blocked)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q, k, v, blocked), atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------ the accelerator strategy on CPU tensors

STRATEGIES = [sra.ROW_GROUPS, sra.GATHERED_KEYS]


def rectify(strategy, q, k, v, blocked, **kwargs):
    """SRA by the named strategy (selected explicitly, whatever the tensors' device)."""
    if strategy == sra.ROW_GROUPS:
        return sra.self_rectifying_attention(q, k, v, blocked, **kwargs)
    return sra.rectified_attention_gathered(q, k, v, sra.token_split(blocked), **kwargs)


def test_strategy_by_device():
    assert sra.strategy_for("cpu") == sra.ROW_GROUPS
    assert sra.strategy_for("cuda:0") == sra.GATHERED_KEYS
    assert sra.strategy_for(torch.device("mps")) == sra.GATHERED_KEYS


def test_token_split_groups_items_that_share_a_mask():
    blocked = torch.zeros(4, 10, dtype=torch.bool)
    blocked[[0, 2], 2:5] = True      # cond/uncond of item 0 (CFG batch: [c0, c1, u0, u1])
    blocked[[1, 3], 6:] = True       # item 1
    groups = sra.token_split(blocked)
    assert len(groups) == 2
    by_first = {int(g.inside[0]): g for g in groups}
    assert by_first[2].items.tolist() == [0, 2] and by_first[2].inside.tolist() == [2, 3, 4]
    assert by_first[2].outside.tolist() == [0, 1, 5, 6, 7, 8, 9]
    assert by_first[6].items.tolist() == [1, 3]
    shared = sra.token_split(blocked[:1].expand(3, -1))
    assert len(shared) == 1 and shared[0].items == slice(None)
    contiguous = sra.token_split(torch.cat([blocked[:1], blocked[:1], blocked[1:2]]))
    assert sorted((g.items.start, g.items.stop) for g in contiguous) == [(0, 2), (2, 3)]
    full_and_empty = torch.zeros(2, 10, dtype=torch.bool)
    full_and_empty[0] = True
    assert sra.token_split(full_and_empty) == []  # nothing to rectify: plain attention everywhere


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("per_item", [False, True])
@pytest.mark.parametrize("query_scale", [1.0, 0.3])
def test_both_strategies_equal_the_explicit_softmax_rule(strategy, per_item, query_scale):
    q, k, v = _qkv(batch=4)
    g = torch.Generator().manual_seed(1)
    blocked = torch.rand(2 if per_item else 1, 30, generator=g) > 0.6
    if per_item:  # a CFG batch: items 0/2 and 1/3 share a mask, so groups gather non-contiguous items
        blocked = blocked.repeat(2, 1)
    out = rectify(strategy, q, k, v, blocked, query_scale=query_scale)
    torch.testing.assert_close(out, _reference(q, k, v, blocked, query_scale), atol=1e-5, rtol=1e-5)


class RecordingDense:
    """The dense back-end of the gathered strategy, recording what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, mask):
        self.calls.append((q.clone(), k.clone(), v.clone(), mask))
        return sra.sdpa_dense(q, k, v, mask)


@pytest.mark.parametrize("head_groups", [1, 2])
def test_gathered_strategy_keeps_the_full_call_and_gives_inside_queries_only_outside_keys(head_groups):
    q, k, v = _qkv()
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 3:9] = True
    blocked[0, 20:23] = True
    inside, outside = blocked[0].nonzero().squeeze(1), (~blocked[0]).nonzero().squeeze(1)
    full_calls = []

    def full():
        full_calls.append(1)
        return sra.plain_attention(q, k, v)

    plain = sra.plain_attention(q, k, v)
    dense = RecordingDense()
    out = sra.rectified_attention_gathered(q, k, v, sra.token_split(blocked), full=full, dense=dense,
                                           head_groups=head_groups)
    assert len(full_calls) == 1
    assert len(dense.calls) == head_groups  # 3 heads: all at once, or 2 + 1
    heads_seen = 0
    for dq, dk, dv, mask in dense.calls:
        hs = slice(heads_seen, heads_seen + dq.shape[1])
        heads_seen += dq.shape[1]
        assert mask is None  # no mask tensor: flash-eligible
        assert torch.equal(dq, q[:, hs][:, :, inside]) and torch.equal(dk, k[:, hs][:, :, outside])
        assert torch.equal(dv, v[:, hs][:, :, outside])
    assert heads_seen == 3
    assert torch.equal(out[:, ~blocked[0]], plain[:, ~blocked[0]])  # outside rows: the full call's own output
    torch.testing.assert_close(out, _reference(q, k, v, blocked), atol=1e-5, rtol=1e-5)
    # poisoned masked values do not move the masked queries by one bit
    v_poisoned = v.clone()
    v_poisoned[:, :, inside] = 1e30
    again = sra.rectified_attention_gathered(q, k, v_poisoned, sra.token_split(blocked), head_groups=head_groups)
    assert torch.equal(again.view(2, 30, 3, 8)[:, inside], out.view(2, 30, 3, 8)[:, inside])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_both_strategies_heads_first_full_empty_and_strength(strategy):
    q, k, v = _qkv()
    plain = sra.plain_attention(q, k, v)
    blocked = torch.zeros(1, 30, dtype=torch.bool)
    blocked[0, 10:20] = True
    heads_first = rectify(strategy, q, k, v, blocked, heads_first_out=True)
    assert heads_first.shape == q.shape
    torch.testing.assert_close(heads_first.transpose(1, 2).reshape(2, 30, -1), _reference(q, k, v, blocked),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(rectify(strategy, q, k, v, torch.zeros(1, 30, dtype=torch.bool)), plain)
    full = rectify(strategy, q, k, v, torch.ones(1, 30, dtype=torch.bool))
    assert torch.equal(full, plain)
    per_item = torch.zeros(2, 30, dtype=torch.bool)
    per_item[0] = True  # item 0 fully covered, item 1 partly
    per_item[1, :4] = True
    out = rectify(strategy, q, k, v, per_item)
    assert torch.equal(out[0], plain[0]) and not out.isnan().any()
    torch.testing.assert_close(out[1:], _reference(q[1:], k[1:], v[1:], per_item[1:]), atol=1e-5, rtol=1e-5)
    half = rectify(strategy, q, k, v, blocked, strength=0.5)
    torch.testing.assert_close(half, 0.5 * plain + 0.5 * _reference(q, k, v, blocked), atol=1e-5, rtol=1e-5)
    assert torch.equal(rectify(strategy, q, k, v, blocked, strength=0.0), plain)


@pytest.mark.parametrize("pad_ndim", [2, 3, 4])
@pytest.mark.parametrize("additive", [False, True])
def test_gathered_strategy_respects_the_callers_mask(pad_ndim, additive):
    q, k, v, blocked, pad, given = _callers_mask_case(pad_ndim)
    plain = sra.plain_attention(q, k, v, pad)
    if additive:
        given = torch.zeros(given.shape).masked_fill(~given, float("-inf"))

    def full():
        return sra.plain_attention(q, k, v, sra._sdpa_mask(given))

    out = sra.rectified_attention_gathered(q, k, v, sra.token_split(blocked), full=full, attn_mask=given)
    _assert_callers_mask_respected(out, plain, q, k, v, pad)


# ------------------------------------------------------------------ guidance

def test_removal_guidance_form_and_scale_zero():
    plain, redirected = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert sra.removal_guidance(plain, redirected, 0.0) is plain
    torch.testing.assert_close(sra.removal_guidance(plain, redirected, 9.0), plain + 9.0 * (redirected - plain))
    torch.testing.assert_close(sra.removal_guidance(plain, redirected, 1.0), redirected)


def test_step_index_and_suppression_window():
    sigmas = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.0])
    assert [sra.step_index(s, sigmas) for s in sigmas[:-1]] == [0, 1, 2, 3, 4]
    assert sra.step_index(torch.tensor(3.0), sigmas) == 2  # a midpoint evaluation (Heun, DPM2)
    assert sra.suppression_active(9) and not sra.suppression_active(10)
