"""Self-rectifying attention and the removal guider inside a real ComfyUI, on tiny models built in-process.

Each attention call of the patched model is inspected by a spy override chained on top of EraseKit's: it re-runs
the call with huge values at the masked keys (masked queries must not move by one bit, i.e. their attention
probability to masked keys is exactly 0), compares every row with the explicit softmax rule, and checks that
unmasked queries (FLUX text tokens included) keep the back-end's plain output (to float rounding: the back-end
runs them as a subset of the queries).
"""
import math
import sys

import pytest
import torch

from erasekit.erasers import attention as core

SEQ_TEXT = 7
OUTSIDE_ATOL = 1e-6  # float32 rounding of attention outputs of size ~0.03; any real change is orders larger


# ------------------------------------------------------------------ tiny models

def _init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.05))
    return model


def _patcher(model):
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_unet(kind="sd15", in_channels=4):
    import comfy.supported_models as sm
    base = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "in_channels": in_channels, "model_channels": 32, "num_res_blocks": [1, 1, 1],
            "channel_mult": [1, 2, 2], "use_temporal_resblock": False, "use_temporal_attention": False}
    if kind == "sd15":
        config = sm.SD15(dict(base, adm_in_channels=None, context_dim=32, use_linear_in_transformer=False,
                              transformer_depth=[1, 1, 0], transformer_depth_middle=1,
                              transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0]))
    else:  # SDXL layout: linear projections, no attention at the top level, pooled text in y
        config = sm.SDXL(dict(base, adm_in_channels=16, context_dim=32, use_linear_in_transformer=True,
                              transformer_depth=[0, 1, 2], transformer_depth_middle=1,
                              transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2]))
        config.unet_config["num_head_channels"] = 8
    return _patcher(_init(config.get_model({}), 0))


def tiny_flux(in_channels=16):
    import comfy.supported_models as sm
    config = sm.Flux({"image_model": "flux", "guidance_embed": True, "in_channels": in_channels, "out_channels": 16,
                      "vec_in_dim": 16, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4,
                      "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
                      "qkv_bias": True})
    return _patcher(_init(config.get_model({}), 1))


def _inputs(patcher, batch=1, height=12, width=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    net = patcher.model.diffusion_model
    flux = type(net).__name__ == "Flux"
    x = torch.randn(batch, 16 if flux else 4, height, width, generator=g)
    sigma = torch.full((batch,), 0.7 if flux else 3.0)
    extra = {"c_crossattn": torch.randn(batch, SEQ_TEXT if flux else 11, 32, generator=g)}
    if flux:
        extra.update(y=torch.randn(batch, 16, generator=g), guidance=torch.full((batch,), 3.5))
    elif getattr(net, "adm_in_channels", None):
        extra["y"] = torch.randn(batch, 16, generator=g)
    return x, sigma, extra


def sampling_options(patcher, cond_or_uncond=(0,)):
    """The transformer_options a sampler gives the model: the MODEL's own, plus its patcher-level wrappers (merged
    as ``comfy.sampler_helpers.prepare_model_patcher`` does)."""
    from comfy import patcher_extension
    to = patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    to["cond_or_uncond"] = list(cond_or_uncond)
    return to


def forward(patcher, x, sigma, extra, spy=None):
    to = sampling_options(patcher)
    if spy is not None:
        to["optimized_attention_override"] = spy.chained_to(to.get("optimized_attention_override"))
    return patcher.model.apply_model(x, sigma, transformer_options=to, **extra)


def node(comfy, name):
    return comfy.node_class(name)


def pack_core(comfy):
    """The pack's own ``erasers.attention`` module (ComfyUI imports the pack under its folder's path)."""
    return sys.modules[node(comfy, "EraseKitSelfRectifyingAttention").__module__].core


def apply_sra(comfy, patcher, mask, strength=1.0, start=0.0, end=1.0, blocks="all"):
    return node(comfy, "EraseKitSelfRectifyingAttention").execute(patcher, mask, strength, start, end, blocks)[0]


def object_mask(height, width, box):
    """Pixel-space mask (8x the latent) with a rectangle given in latent pixels."""
    mask = torch.zeros(1, height * 8, width * 8)
    top, left, bottom, right = box
    mask[:, top * 8:bottom * 8, left * 8:right * 8] = 1.0
    return mask


# ------------------------------------------------------------------ the spy

class Spy:
    """Chained on top of EraseKit's override: checks every self-attention call it sees."""

    def __init__(self, latent_mask, flux, only_block=None, exact_outside=False):
        self.latent_mask = latent_mask
        self.exact_outside = exact_outside  # the gathered form returns the back-end's own rows: bit for bit
        self.flux = flux
        self.only_block = only_block  # e.g. "output": other blocks must stay plain
        self.checked = []
        self.text_rows_checked = 0
        self.skipped = []
        self.worst_outside = 0.0

    def blocked(self, length, to):
        if self.flux:
            grid = core.flux_image_grid(*self.latent_mask.shape[-2:])
            return core.blocked_tokens(core.grid_mask(self.latent_mask, *grid), length, SEQ_TEXT)
        shape = to.get("activations_shape")
        if shape is None or shape[-2] * shape[-1] != length:
            return None
        return core.blocked_tokens(core.grid_mask(self.latent_mask, shape[-2], shape[-1]), length)

    def chained_to(self, sra_override):
        def spy(func, *args, **kwargs):
            out = sra_override(func, *args, **kwargs)
            q, k, v, heads = args[:4]
            if k.shape[-2] != q.shape[-2] if kwargs.get("skip_reshape") else k.shape[1] != q.shape[1]:
                return out  # cross-attention
            qh, kh, vh = (q, k, v) if kwargs.get("skip_reshape") else (core.split_heads(t, heads) for t in (q, k, v))
            blocked = self.blocked(qh.shape[2], kwargs["transformer_options"])
            if blocked is None or not blocked.any():
                return out
            rows = out.view(out.shape[0], qh.shape[2], -1)
            plain = func(*args, **kwargs).view_as(rows)
            block = kwargs["transformer_options"].get("block")
            if self.only_block is not None and block[0] != self.only_block:
                assert torch.equal(rows, plain), f"{block} was rectified"
                self.skipped.append(block)
                return out
            inside = blocked[0]
            # 1. masked queries: exactly zero weight on masked keys -> immune to anything stored there
            poisoned = [t.clone() for t in args[:3]]
            if kwargs.get("skip_reshape"):
                poisoned[2][:, :, inside] = 1e6
            else:
                poisoned[2][:, inside] = 1e6
            again = sra_override(func, *poisoned, *args[3:], **kwargs).view_as(rows)
            assert torch.equal(again[:, inside], rows[:, inside]), "a masked query attended to a masked key"
            # 2. every row follows the explicit rule softmax(QK^T/sqrt(d) + m')V
            probs = core.sra_probabilities(qh, kh, blocked.expand(qh.shape[0], -1))
            assert torch.equal(probs[:, :, inside][..., inside], torch.zeros_like(probs[:, :, inside][..., inside]))
            want = torch.einsum("bhij,bhjd->bhid", probs, vh.float()).transpose(1, 2).reshape_as(rows)
            torch.testing.assert_close(rows.float(), want, atol=1e-4, rtol=1e-4)
            # 3. unmasked queries (FLUX text tokens included) keep the back-end's plain attention; the back-end
            # runs them as a subset of the queries, which can change the last bits of its rounding only
            self.worst_outside = max(self.worst_outside, (rows[:, ~inside] - plain[:, ~inside]).abs().max().item())
            torch.testing.assert_close(rows[:, ~inside], plain[:, ~inside], atol=OUTSIDE_ATOL, rtol=0)
            if self.exact_outside:
                assert torch.equal(rows[:, ~inside], plain[:, ~inside])
            if self.flux:
                torch.testing.assert_close(rows[:, :SEQ_TEXT], plain[:, :SEQ_TEXT], atol=OUTSIDE_ATOL, rtol=0)
                self.text_rows_checked += 1
            assert not torch.equal(rows[:, inside], plain[:, inside])
            self.checked.append((kwargs["transformer_options"].get("block"), qh.shape[2]))
            return out
        return spy


# ------------------------------------------------------------------ tests

@pytest.fixture(params=["row_groups", "gathered_keys"])
def strategy(request, comfy, monkeypatch):
    """Each device's form on these CPU tensors: the CPU's row groups, and the accelerators' gathered keys."""
    monkeypatch.setattr(pack_core(comfy), "STRATEGY_BY_DEVICE_TYPE", {"cpu": request.param})
    return request.param


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "flux"])
@pytest.mark.parametrize("size", [(12, 10), (13, 9)])
def test_masked_queries_never_attend_to_masked_keys(comfy, strategy, kind, size):
    patcher = tiny_flux() if kind == "flux" else tiny_unet(kind)
    h, w = size
    mask = object_mask(h, w, (3, 2, 9, 7))
    patched = apply_sra(comfy, patcher, mask)
    x, sigma, extra = _inputs(patcher, height=h, width=w)
    spy = Spy(core.latent_mask(mask, h, w), flux=kind == "flux", exact_outside=strategy == "gathered_keys")
    out = forward(patched, x, sigma, extra, spy)
    assert torch.isfinite(out).all()
    levels = {length for _, length in spy.checked}
    if kind == "flux":
        assert len(spy.checked) == 2 and spy.text_rows_checked == 2  # one double + one single block
    else:
        assert len(levels) >= 2, spy.checked  # several UNet levels, odd grids included
    plain = forward(patcher, x, sigma, extra)
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "flux"])
def test_empty_mask_is_bit_for_bit_the_unpatched_model(comfy, strategy, kind):
    patcher = tiny_flux() if kind == "flux" else tiny_unet(kind)
    x, sigma, extra = _inputs(patcher, batch=2)
    patched = apply_sra(comfy, patcher, torch.zeros(1, 96, 80))
    assert torch.equal(forward(patched, x, sigma, extra), forward(patcher, x, sigma, extra))


def test_full_mask_never_gives_nan(comfy, strategy):
    patcher = tiny_unet()
    x, sigma, extra = _inputs(patcher)
    out = forward(apply_sra(comfy, patcher, torch.ones(1, 96, 80)), x, sigma, extra)
    assert torch.isfinite(out).all()


def test_output_blocks_only_and_percent_range(comfy, strategy):
    patcher = tiny_unet("sd15")
    mask = object_mask(12, 10, (3, 2, 9, 7))
    x, sigma, extra = _inputs(patcher)
    spy = Spy(core.latent_mask(mask, 12, 10), flux=False, only_block="output")
    forward(apply_sra(comfy, patcher, mask, blocks="output (decoder)"), x, sigma, extra, spy)
    assert spy.checked and {block[0] for block, _ in spy.checked} == {"output"}
    assert {block[0] for block in spy.skipped} == {"input", "middle"}
    # sigma 3.0 is early in SD sampling (about 20 %); a range starting at 50 % leaves this call plain
    late = apply_sra(comfy, patcher, mask, start=0.5, end=1.0)
    assert torch.equal(forward(late, x, sigma, extra), forward(patcher, x, sigma, extra))


def test_strength_zero_is_plain_and_strength_blends(comfy, strategy):
    patcher = tiny_unet()
    mask = object_mask(12, 10, (3, 2, 9, 7))
    x, sigma, extra = _inputs(patcher)
    plain = forward(patcher, x, sigma, extra)
    assert torch.equal(forward(apply_sra(comfy, patcher, mask, strength=0.0), x, sigma, extra), plain)
    half = forward(apply_sra(comfy, patcher, mask, strength=0.5), x, sigma, extra)
    full = forward(apply_sra(comfy, patcher, mask), x, sigma, extra)
    assert (half - plain).abs().mean() < (full - plain).abs().mean()


def test_composes_with_existing_override_wrappers_and_patches(comfy, strategy):
    from comfy import patcher_extension as pe
    patcher = tiny_unet()
    calls = {"override": 0, "wrapper": 0, "patch": 0}

    def counting_override(func, *args, **kwargs):
        calls["override"] += 1
        return func(*args, **kwargs)

    def counting_wrapper(executor, *args, **kwargs):
        calls["wrapper"] += 1
        return executor(*args, **kwargs)

    def counting_patch(n, extra_options):
        calls["patch"] += 1
        return n

    base = patcher.clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = counting_override
    pe.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test", counting_wrapper, base.model_options, is_model_options=True)
    base.set_model_attn1_output_patch(counting_patch)
    mask = object_mask(12, 10, (3, 2, 9, 7))
    patched = apply_sra(comfy, base, mask)
    twice = apply_sra(comfy, patched, mask)  # two SRA patches stack too
    x, sigma, extra = _inputs(patcher)
    spy = Spy(core.latent_mask(mask, 12, 10), flux=False)
    forward(twice, x, sigma, extra, spy)
    assert calls["override"] > 0 and calls["wrapper"] == 1 and calls["patch"] > 0 and spy.checked
    # the input model was not changed by the node
    assert base.model_options["transformer_options"]["optimized_attention_override"] is counting_override
    assert len(base.model_options["transformer_options"]["patches"]["attn1_output_patch"]) == 1


@pytest.mark.parametrize("backend", ["attention_basic", "attention_pytorch", "attention_sub_quad", "attention_split"])
def test_every_attention_backend(comfy, strategy, monkeypatch, backend):
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules import attention
    query_rows, dense_calls = [], []

    def counting(q, k, *args, **kwargs):  # the back-end, recording the query and key rows of each call
        rows = (q.shape[2], k.shape[2]) if kwargs.get("skip_reshape") else (q.shape[1], k.shape[1])
        query_rows.append(rows[0])
        if rows[0] < rows[1] and kwargs.get("mask") is None:
            dense_calls.append(rows)
        return getattr(attention, backend).__wrapped__(q, k, *args, **kwargs)

    func = attention.wrap_attn(counting)
    # groups of 16 queries: slices, gathers and several calls per attention go through each back-end
    monkeypatch.setattr(pack_core(comfy), "QUERY_CHUNK", 16)
    monkeypatch.setattr(attention, "optimized_attention", func)
    monkeypatch.setattr(attention, "optimized_attention_masked", func)
    monkeypatch.setattr(flux_math, "optimized_attention", func)
    for patcher, flux in ((tiny_unet(), False), (tiny_flux(), True)):
        mask = object_mask(12, 10, (3, 2, 9, 7))
        x, sigma, extra = _inputs(patcher)
        spy = Spy(core.latent_mask(mask, 12, 10), flux=flux)
        query_rows.clear()
        dense_calls.clear()
        out = forward(apply_sra(comfy, patcher, mask), x, sigma, extra, spy)
        assert spy.checked and torch.isfinite(out).all()
        if strategy == "row_groups":
            assert 16 in query_rows  # full groups reached the back-end (no token grid here has 16 tokens)
        else:  # the inside queries reached the back-end dense, over the outside keys only (L - inside of them)
            grid = (6, 5) if flux else (12, 10)
            inside = int(core.grid_mask(core.latent_mask(mask, 12, 10), *grid).sum())
            text = SEQ_TEXT if flux else 0
            assert (inside, text + grid[0] * grid[1] - inside) in dense_calls, dense_calls


@pytest.mark.parametrize("concat_channels", [16 + 64, 48], ids=["fill", "omnieraser"])
def test_flux_fill_and_batched_masks(comfy, strategy, concat_channels):
    """FLUX Fill (16 image + 64 mask channels concatenated) and OmniEraser's 48-channel condition: the same token
    layout; per-item masks and cond/uncond batches."""
    patcher = tiny_flux(in_channels=16 + concat_channels)
    mask = torch.zeros(2, 96, 80)
    mask[0, 16:48, 16:40] = 1
    mask[1, 50:90, 30:70] = 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 12, 10, generator=g)  # cond + uncond of a batch of 2
    extra = {"c_crossattn": torch.randn(4, SEQ_TEXT, 32, generator=g), "y": torch.randn(4, 16, generator=g),
             "guidance": torch.full((4,), 30.0), "c_concat": torch.randn(4, concat_channels, 12, 10, generator=g)}
    patched = apply_sra(comfy, patcher, mask)
    to = sampling_options(patched, (0, 1))
    out = patched.model.apply_model(x, torch.full((4,), 0.7), transformer_options=to, **extra)
    # per-item masks: item i of each chunk follows mask i, so each item equals a batch-1 run with its own mask
    for i in range(4):
        single = apply_sra(comfy, patcher, mask[i % 2:i % 2 + 1])
        to1 = sampling_options(single)
        one = single.model.apply_model(x[i:i + 1], torch.full((1,), 0.7), transformer_options=to1,
                                       **{k: v[i:i + 1] for k, v in extra.items()})
        torch.testing.assert_close(out[i:i + 1], one, atol=1e-5, rtol=1e-5)


def test_bad_masks_raise_clear_errors(comfy):
    patcher = tiny_unet()
    x, sigma, extra = _inputs(patcher, batch=2)
    with pytest.raises(ValueError, match="mask batch of 3 does not match the latent batch of 2"):
        forward(apply_sra(comfy, patcher, torch.zeros(3, 96, 80)), x, sigma, extra)
    with pytest.raises(ValueError, match="aspect ratios differ"):
        forward(apply_sra(comfy, patcher, torch.zeros(1, 80, 96)), x, sigma, extra)
    with pytest.raises(ValueError, match="start_percent"):
        apply_sra(comfy, patcher, torch.zeros(1, 96, 80), start=0.8, end=0.2)


def test_unsupported_model_is_refused(comfy):
    from types import SimpleNamespace
    other = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="supports UNet .* and FLUX models; .* Linear"):
        apply_sra(comfy, other, torch.zeros(1, 8, 8))


# ------------------------------------------------------------------ guider

def _sample(guider, patcher, steps=2, seed=0, callback=None):
    import comfy.samplers
    import comfy.sample
    latent = torch.zeros(1, 4, 12, 10)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)
    sampler = comfy.samplers.sampler_object("euler")
    return guider.sample(noise, latent, sampler, sigmas, callback=callback, seed=seed)


def _conds(seed, length=11):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, 32, generator=g), {}]]


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_guider_scale_zero_is_plain_cfg_exactly(comfy, strategy, cfg):
    from comfy.samplers import CFGGuider
    patcher = tiny_unet()
    positive, negative = _conds(1), _conds(2)
    mask = object_mask(12, 10, (3, 2, 9, 7))
    plain = CFGGuider(patcher)
    plain.set_conds(positive, negative)
    plain.set_cfg(cfg)
    guider_node = node(comfy, "EraseKitRemovalGuider")
    zero = guider_node.execute(patcher, positive, negative, mask, cfg, 0.0, 0.3, 9, "all")[0]
    assert torch.equal(_sample(zero, patcher), _sample(plain, patcher))
    removal = guider_node.execute(patcher, positive, negative, mask, cfg, 9.0, 0.3, 9, "all")[0]
    guided = _sample(removal, patcher)
    assert torch.isfinite(guided).all() and not torch.equal(guided, _sample(plain, patcher))


def test_guider_form_and_suppression(comfy, strategy, monkeypatch):
    """One step: plain + 9 (redirected - plain), the redirected pass using logit scale 0.3 in step 0."""
    from comfy import samplers
    patcher = tiny_unet()
    positive, negative = _conds(1), _conds(2)
    mask = object_mask(12, 10, (3, 2, 9, 7))
    guider = node(comfy, "EraseKitRemovalGuider").execute(patcher, positive, negative, mask, 1.0, 9.0, 0.3, 9, "all")[0]
    seen = []
    real = samplers.sampling_function

    def recording(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
        out = real(model, x, timestep, uncond, cond, cond_scale, model_options=model_options, seed=seed)
        seen.append((guider.patch.query_scale, out))
        return out

    monkeypatch.setattr(samplers, "sampling_function", recording)
    denoised = []
    _sample(guider, patcher, steps=1, callback=lambda i, x0, x, total: denoised.append(x0))
    assert len(seen) == 2  # plain + redirected
    assert seen[1][0] == 0.3
    (_, plain), (_, redirected) = seen
    assert not torch.equal(plain, redirected)
    torch.testing.assert_close(denoised[0], plain + 9.0 * (redirected - plain))


def test_guider_rejects_mismatched_mask(comfy):
    patcher = tiny_unet()
    guider = node(comfy, "EraseKitRemovalGuider").execute(patcher, _conds(1), _conds(2), torch.zeros(1, 64, 128),
                                                         1.0, 9.0, 0.3, 9, "all")[0]
    with pytest.raises(ValueError, match="aspect ratios differ"):
        _sample(guider, patcher)
