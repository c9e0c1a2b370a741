"""The memory side of the FLUX trainer: fp8 / offloaded frozen weights, the activation table, the plans (CPU, fp32)."""
import pytest
import torch

from erasekit.train import eraser_lora as core
from erasekit.train import lora, memory

diffusers = pytest.importorskip("diffusers")



def _layer(out_features=48, in_features=32, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.mul_(0.1)  # FLUX-like magnitudes (|w| ~ 0.02): plain e4m3fn would be mostly subnormal
    return layer.requires_grad_(False)


def test_fp8_storage_keeps_one_byte_per_weight_and_up_casts_per_layer():
    layer = _layer()
    frozen = memory.FrozenLinear(layer, "fp8")
    assert frozen.stored.dtype == torch.float8_e4m3fn and frozen.stored_bytes() == 48 * 32 + 48 * 4
    assert not list(frozen.parameters())  # nothing for an optimiser, DDP or .to() to touch
    x = torch.randn(5, 32)
    reference = layer(x)
    error = (frozen(x) - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.04  # e4m3fn with a per-tensor scale: ~2-3 significant bits lost, not the function
    exact = torch.nn.functional.linear(x, frozen.weight_for(x.device, torch.float32), layer.bias)
    assert torch.allclose(frozen(x), exact, rtol=1e-6, atol=1e-7)  # the scale applied in the matmul
    assert frozen(x.double()).dtype == torch.float64  # computes in the input's dtype


def test_the_cpu_fp8_up_cast_is_torchs_cast_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    exact = codes.to(torch.float32)
    finite = ~exact.isnan()
    for dtype in (torch.float32, torch.float64):
        values, factor = memory.upcast_fp8(codes, dtype)
        assert torch.equal((values * factor)[finite], exact.to(dtype)[finite])


def test_frozen_linear_keeps_no_weight_copy_or_activation_for_backward():
    frozen = memory.FrozenLinear(_layer(), "fp8")
    x = torch.randn(7, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = frozen(x)
    assert saved == []  # F.linear would keep the up-cast fp32 weight: 4 bytes per frozen parameter
    y.square().sum().backward()
    weight = frozen.weight_for(x.device, torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, weight, frozen.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_freeze_linears_stores_and_offloads_what_the_plan_says():
    model = torch.nn.Sequential(_layer(16, 8), torch.nn.GELU(), _layer(8, 16, seed=1), torch.nn.LayerNorm(8))
    x = torch.randn(3, 8)
    reference = model(x)
    assert memory.freeze_linears(model, "bf16", "cpu", offload=lambda name: name == "2") == 2
    assert isinstance(model[0], memory.FrozenLinear) and model[0].stored.dtype == torch.bfloat16
    assert model[2].offloaded and model[2].stored_bytes(on_device=True) == 8 * 4  # only its bias stays
    assert torch.allclose(model(x), reference, atol=2e-2)


def _facts():
    """Two double and four single blocks of 1 GiB of Linear weights each (bf16), FLUX.1-dev's width."""
    linears, order = {}, []
    for prefix, count in (("single_transformer_blocks", 4), ("transformer_blocks", 2)):
        for i in reversed(range(count)):
            name = f"{prefix}.{i}.proj"
            linears[name] = (2 ** 29, 2 ** 30)
            order.append([name])
    return core.MemoryFacts(linears, 0, 3072, 2, 4, 512, order)


def test_plans_offload_whole_blocks_until_the_estimate_fits():
    facts = _facts()
    full, none = core.plan_memory(facts, memory.PLANS["full"], 10 ** 6, 1024, 2)
    assert none == set() and full.weights == 6 * 2 ** 30
    fp8, none = core.plan_memory(facts, memory.PLANS["16gb"], 10 ** 6, 1024, 2)
    assert none == set() and fp8.weights == 3 * 2 ** 30 and fp8.activations < full.activations
    tight = memory.MemoryPlan("tight", "bf16", True, 6.0, "")
    estimate, offloaded = core.plan_memory(facts, tight, 10 ** 6, 1024, 2)
    assert estimate.total <= memory.FIT * 6 * memory.GIB
    assert offloaded == {"single_transformer_blocks.3.proj", "single_transformer_blocks.2.proj",
                         "single_transformer_blocks.1.proj"}  # the last blocks first, no more than needed
    assert memory.resolve_plan("auto", "cpu").name == "full"
    with pytest.raises(ValueError, match="memory plan must be one of"):
        memory.resolve_plan("8gb", "cpu")


def _tiny_flux(double, single):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12)).requires_grad_(False)


def _saved_units(double, single, latent=32, text_tokens=32):
    from erasekit.train.flux import DiffusersFlux

    model = _tiny_flux(double, single)
    text = {"prompt_embeds": torch.randn(1, text_tokens, 32), "pooled_prompt_embeds": torch.randn(1, 32),
            "text_ids": torch.zeros(text_tokens, 3)}
    adapter = DiffusersFlux(model, None, text, "cpu")
    lora.LoraSlots(adapter.lora_targets(), 4, 4).attach()
    noisy, condition = torch.randn(1, 16, latent, latent), torch.randn(1, 48, latent, latent)
    tokens = (latent // 2) ** 2 + text_tokens
    return memory.saved_activation_units(lambda: adapter.velocity(noisy, condition, torch.tensor([0.5]), 3.5),
                                         tokens, 128, model)


def test_the_activation_table_is_what_the_cpu_measures():
    """ACTIVATION_UNITS re-measured on diffusers' FLUX with LoRA slots (ComfyUI's side: tests/comfy)."""
    one = _saved_units(1, 1)
    double, single = _saved_units(2, 1) - one, _saved_units(1, 2) - one
    table = memory.ACTIVATION_UNITS
    assert double == pytest.approx(table["double"], rel=0.15)
    assert single == pytest.approx(table["single"], rel=0.15)
    assert one - double - single == pytest.approx(table["outside"], rel=0.3)


def test_the_16gb_plan_leaves_no_full_precision_weight_alive():
    """After the plan is applied, nothing holds the replaced layers (their weights would stay on the GPU)."""
    import gc
    import weakref

    from erasekit.train.flux import DiffusersFlux

    text = {"prompt_embeds": torch.randn(1, 8, 32), "pooled_prompt_embeds": torch.randn(1, 32),
            "text_ids": torch.zeros(8, 3)}
    adapter = DiffusersFlux(_tiny_flux(1, 1), None, text, "cpu")
    originals = [weakref.ref(m) for m in adapter.module.modules() if isinstance(m, torch.nn.Linear)]
    job = core.EraserJob(rank=4, memory_plan="16gb", mixed_precision="no", resolution=64)
    run = core.plan_run(job, adapter)
    slots, model = core.build_model(job, adapter, run)
    gc.collect()
    assert originals and not [r for r in originals if r() is not None]
    assert all(isinstance(t.module, memory.FrozenLinear) for t in slots.targets.values())


def test_fp8_plan_gives_the_same_training_numbers_within_fp8_error():
    """The DiffusersFlux adapter under the 16gb plan (fp8 storage, checkpointing) against full precision: the same
    loss to within fp8's rounding on one step, and every LoRA gradient reaches the slots."""
    from erasekit.train.flux import DiffusersFlux

    generator = torch.Generator().manual_seed(0)
    text = {"prompt_embeds": torch.randn(1, 8, 32, generator=generator),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=generator), "text_ids": torch.zeros(8, 3)}
    noisy, condition = torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 48, 8, 8, generator=generator)
    outputs = {}
    for plan in ("full", "16gb"):
        adapter = DiffusersFlux(_tiny_flux(1, 1), None, text, "cpu")
        adapter.apply_plan(memory.PLANS[plan], torch.float32)
        adapter.set_gradient_checkpointing(memory.PLANS[plan].gradient_checkpointing)
        slots = lora.LoraSlots(adapter.lora_targets(), 4, 4, seed=1)
        with torch.no_grad():
            for slot in slots.slots:
                slot.lora_B.normal_(0, 0.1)
        slots.attach()
        out = core.EraserModel(adapter, slots)(noisy, condition, torch.tensor([0.7]), 3.5)
        out.square().mean().backward()
        outputs[plan] = (out.detach(), {k: p.grad.clone() for k, p in slots.parameters_by_name().items()})
    assert isinstance(adapter.module.transformer_blocks[0].attn.to_q, memory.FrozenLinear)
    (full, full_grads), (fp8, fp8_grads) = outputs["full"], outputs["16gb"]
    assert (fp8 - full).abs().max() / full.abs().max() < 0.05
    for name, grad in full_grads.items():
        assert fp8_grads[name].abs().max() > 0, name
        assert torch.nn.functional.cosine_similarity(grad.flatten(), fp8_grads[name].flatten(), dim=0) > 0.95, name
