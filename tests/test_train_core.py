"""The model-agnostic training core: paired crops, flow matching, LoRA helpers, caches, curves, the loop."""
import numpy as np
import pytest
import torch

from erasekit.train import caching, curves, flow_matching, lora, loop
from erasekit.train.datasets import PairedCropDataset, paired_random_crop


def _triplet(height=40, width=56, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), bool)
    mask[10:20, 12:30] = True
    return {"source": source, "mask": mask, "target": 255 - source}


def test_paired_crop_cuts_all_three_at_the_same_place():
    sample = _triplet()
    ds = PairedCropDataset([sample], size=16, seed=3)
    seen = set()
    for draw in range(12):
        item = ds[(0, draw)]
        assert item["source"].shape == (16, 16, 3) and item["mask"].shape == (16, 16)
        assert torch.allclose(item["target"], 1 - item["source"], atol=1e-6)
        # Find the window in the full image: the source crop appears exactly once.
        src = (item["source"].numpy() * 255).round().astype(np.uint8)
        hits = [(t, l) for t in range(40 - 15) for l in range(56 - 15)
                if np.array_equal(sample["source"][t:t + 16, l:l + 16], src)]
        assert len(hits) == 1
        t, l = hits[0]
        assert np.array_equal(item["mask"].numpy() > 0.5, sample["mask"][t:t + 16, l:l + 16])
        seen.add(hits[0])
    assert len(seen) > 3  # crops are random


def test_sample_depends_only_on_its_key_and_variants_repeat():
    ds = PairedCropDataset([_triplet(), _triplet(seed=1)], size=16, seed=5)
    assert torch.equal(ds[(1, 7)]["source"], ds[(1, 7)]["source"])
    assert not torch.equal(ds[(1, 7)]["source"], ds[(1, 8)]["source"])
    cached = PairedCropDataset([_triplet()], size=16, seed=5, variants=3)
    assert torch.equal(cached[(0, 1)]["source"], cached[(0, 4)]["source"])
    assert cached[(0, 4)]["key"] == "0:1"


def test_small_images_are_upscaled_like_omnieraser_and_masks_stay_binary():
    rng = np.random.default_rng(0)
    source, mask, target = paired_random_crop(*(lambda s: (s["source"], s["mask"], s["target"]))(_triplet(12, 20)), 16, rng)
    assert source.shape == (16, 16, 3) and mask.shape == (16, 16) and mask.dtype == bool


def test_mask_augmentation_uses_the_mask_core():
    from erasekit.train.datasets import smarteraser_mask_augmenter

    sample = _triplet(64, 64)
    ds = PairedCropDataset([sample], size=64, seed=0, augment_mask=smarteraser_mask_augmenter)
    areas = {int(ds[(0, d)]["mask"].sum()) for d in range(8)}
    assert len(areas) > 1  # irregularisation changes the mask from draw to draw


def test_bad_datasets_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        PairedCropDataset([], size=16)
    bad = _triplet()
    bad["target"] = bad["target"][:, :50]
    with pytest.raises(ValueError, match="source is 56×40 but target is 50×40"):
        PairedCropDataset([bad], size=16).validate()
    wrong_mask = _triplet()
    wrong_mask["mask"] = wrong_mask["mask"][:30]
    with pytest.raises(ValueError, match="mask is 56×30"):
        PairedCropDataset([wrong_mask], size=16)[0]
    with pytest.raises(ValueError, match="multiple of 16"):
        PairedCropDataset([_triplet()], size=20)


def test_flow_matching_grid_target_and_loss():
    g = torch.Generator().manual_seed(0)
    sigmas = flow_matching.sample_sigmas(1000, generator=g)
    assert sigmas.min() >= 1e-3 and sigmas.max() <= 1.0
    assert torch.allclose(sigmas * 1000, (sigmas * 1000).round())  # on the scheduler's grid
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    s = torch.tensor([0.25, 1.0])
    x = flow_matching.noisy_latents(latents, noise, s)
    assert torch.allclose(x[1], noise[1]) and torch.allclose(x[0], 0.75 * latents[0] + 0.25 * noise[0])
    assert flow_matching.flow_matching_loss(noise - latents, latents, noise, s) == 0
    assert flow_matching.flow_matching_loss(torch.zeros_like(noise), latents, noise, s) > 0
    shifted = flow_matching.sample_sigmas(8, generator=torch.Generator().manual_seed(0), shift=3.0)
    plain = flow_matching.sample_sigmas(8, generator=torch.Generator().manual_seed(0))
    assert torch.all(shifted >= plain)


def test_lora_slots_on_fused_rows_equal_one_lora_per_layer():
    """q, k, v as row slices of one fused weight (ComfyUI) compute what three separate adapted layers compute."""
    torch.manual_seed(0)
    fused = torch.nn.Linear(6, 9).requires_grad_(False)
    parts = {n: torch.nn.Linear(6, 3).requires_grad_(False) for n in "qkv"}
    with torch.no_grad():
        for i, n in enumerate("qkv"):
            parts[n].weight.copy_(fused.weight[3 * i:3 * i + 3])
            parts[n].bias.copy_(fused.bias[3 * i:3 * i + 3])
    separate = lora.LoraSlots({n: lora.LoraTarget(parts[n], 6, 3) for n in "qkv"}, rank=2, alpha=4, seed=3)
    rows = lora.LoraSlots({n: lora.LoraTarget(fused, 6, 9, (3 * i, 3)) for i, n in enumerate("qkv")}, rank=2,
                          alpha=4, seed=3)
    generator = torch.Generator().manual_seed(1)
    for a, b in zip(separate.slots, rows.slots):
        assert torch.equal(a.lora_A, b.lora_A)  # the same start from the same names, seed and shapes
        with torch.no_grad():
            a.lora_B.normal_(generator=generator)
            b.lora_B.copy_(a.lora_B)
    separate.attach()
    rows.attach()
    x = torch.randn(4, 6)
    expected = torch.cat([parts[n](x) for n in "qkv"], -1)
    plain = torch.nn.functional.linear(x, fused.weight, fused.bias)
    assert torch.allclose(fused(x), expected, atol=1e-6) and not torch.allclose(expected, plain, atol=1e-3)
    rows.detach()
    assert not torch.allclose(fused(x), expected, atol=1e-4)  # detached: the plain layer again


def test_a_widened_input_reads_all_features_in_the_slot_and_the_old_ones_in_the_layer():
    """x_embedder 64 → 256: the frozen layer sees the first features (the official zero-padded widening computes
    exactly that) and the LoRA all of them."""
    torch.manual_seed(0)
    narrow = torch.nn.Linear(4, 5).requires_grad_(False)
    wide = torch.nn.Linear(16, 5).requires_grad_(False)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :4].copy_(narrow.weight)
        wide.bias.copy_(narrow.bias)
    slots = lora.LoraSlots({"x_embedder": lora.LoraTarget(narrow, 16, 5, None, 4)}, rank=2, alpha=2)
    reference = lora.LoraSlots({"x_embedder": lora.LoraTarget(wide, 16, 5)}, rank=2, alpha=2)
    with torch.no_grad():
        for slot in (slots.slots[0], reference.slots[0]):
            slot.lora_B.fill_(0.3)
    slots.attach()
    reference.attach()
    x = torch.randn(3, 16)
    assert torch.allclose(narrow(x), wide(x), atol=1e-6)
    state = slots.state_dict_for_file("transformer.")
    assert state["transformer.x_embedder.lora_A.weight"].shape == (2, 16)


def test_masks_are_binarised_by_one_rule_whatever_their_encoding():
    from erasekit.erasers.layout import binarize as binary_mask  # the rule the training datasets apply

    pattern = np.zeros((4, 4), bool)
    pattern[1:3, 1:3] = True
    for encoded in (pattern, pattern.astype(np.uint8), pattern.astype(np.uint8) * 255, pattern * 0.9,
                    np.where(pattern, 200, 20).astype(np.uint8), pattern.astype(np.float32) * 255):
        assert np.array_equal(binary_mask(encoded), pattern), encoded.dtype
    assert not binary_mask(np.full((2, 2), 0.4)).any() and binary_mask(np.full((2, 2), 0.5)).all()
    sample = _triplet(48, 64)
    ds = PairedCropDataset([{**sample, "mask": sample["mask"].astype(np.uint8)}], size=48, seed=0)
    assert ds[(0, 0)]["mask"].sum() > 0  # a uint8 {0, 1} mask is not silently empty (every 48 px crop holds it)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def test_lora_inject_save_load_round_trip(tmp_path):
    model = _Toy()
    params = lora.inject_lora(model, ["proj", "out"], rank=2, alpha=2)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    assert not model.proj.base_layer.weight.requires_grad
    with torch.no_grad():
        for p in params.values():
            p.normal_()
    state = lora.lora_state_dict(model, prefix="transformer.")
    assert set(state) == {f"transformer.{m}.lora_{ab}.weight" for m in ("proj", "out") for ab in "AB"}
    path = lora.save_lora_file(tmp_path / "l.safetensors", state, {"rank": 2})
    other = _Toy()
    lora.inject_lora(other, ["proj", "out"], rank=2, alpha=2)
    assert lora.load_lora_state_dict(other, lora.load_lora_file(path), prefix="transformer.") == 4
    x = torch.randn(3, 6)
    assert torch.allclose(model(x), other(x))
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_lora_state_dict(other, {"transformer.nope.lora_A.weight": torch.zeros(1)}, prefix="transformer.")


def test_caches_compute_each_key_once(tmp_path):
    calls = []
    cache = caching.TextEmbeddingCache(tmp_path / "text", tag="enc")

    def encode(caption):
        calls.append(caption)
        return {"embeds": torch.full((2,), float(len(caption)))}

    for _ in range(3):
        out = cache.get("There is nothing here.", encode)
    assert calls == ["There is nothing here."] and out["embeds"][0] == 22
    fresh = caching.TextEmbeddingCache(tmp_path / "text", tag="enc")  # from disk, no encoder run
    assert fresh.get("There is nothing here.", encode)["embeds"][0] == 22 and len(calls) == 1
    assert caching.TextEmbeddingCache(tmp_path / "text", tag="other").get("There is nothing here.", encode)
    assert len(calls) == 2  # another model tag is another entry
    mean, std = torch.zeros(1000), torch.full((1000,), 2.0)
    draw = caching.sample_latent(mean, std, torch.Generator().manual_seed(0))
    assert 1.8 < draw.std() < 2.2


def test_loss_curve_picture(tmp_path):
    history = [(i, 1.0 / i) for i in range(1, 50)]
    image = curves.loss_curve_array(history)
    assert image.shape == (360, 640, 3) and image.dtype == np.float32 and image.min() < 0.5
    assert curves.render_loss_curve([]).size == (640, 360)
    assert curves.render_loss_curve([(1, 0.5)]).size == (640, 360)
    path = curves.save_loss_curve(history, tmp_path / "c" / "loss.png")
    assert (tmp_path / "c" / "loss.png").stat().st_size > 1000 and path.endswith("loss.png")


# ------------------------------------------------------------------------------------------ the loop

class _Regression(torch.utils.data.Dataset):
    """y = W·x with per-key deterministic x."""

    def __init__(self, n=10):
        self.n = n
        self.w = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, draw = key
        x = torch.randn(6, generator=torch.Generator().manual_seed(index * 1000 + draw))
        return {"x": x, "y": self.w @ x}


def _toy_step(model, batch, generator):
    noise = 0.01 * torch.randn(batch["x"].shape, generator=generator)
    return torch.nn.functional.mse_loss(model(batch["x"] + noise), batch["y"])


def _toy_run(tmp_path, steps, resume=False, check_interrupt=None, lr=3e-2, **kw):
    model = _Toy()
    params = lora.inject_lora(model, ["proj", "out"], rank=4, alpha=4)
    config = loop.LoopConfig(steps=steps, batch_size=2, grad_accum=3, learning_rate=lr, seed=7,
                             mixed_precision="no", checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2,
                             output_dir=str(tmp_path), lr_scheduler="cosine_with_restarts", **kw)
    result = loop.train(_toy_step, params, _Regression(), config, model=model, resume=resume,
                        collate_fn=torch.utils.data.default_collate, check_interrupt=check_interrupt)
    return result, {k: v.detach().clone() for k, v in params.items()}


def test_loop_learns_and_writes_curve_logs_and_checkpoints(tmp_path):
    progress = []
    model = _Toy()
    params = lora.inject_lora(model, ["proj", "out"], rank=4, alpha=4)
    config = loop.LoopConfig(steps=40, batch_size=2, grad_accum=2, learning_rate=3e-2, seed=0,
                             checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=10, keep_checkpoints=2,
                             output_dir=str(tmp_path), validate_every=20)
    validated = []
    result = loop.train(_toy_step, params, _Regression(), config, model=model,
                        collate_fn=torch.utils.data.default_collate,
                        progress=lambda s, t, l: progress.append((s, t, l)),
                        validate=lambda step: validated.append(step) or {"scalars": {"val": 1.0}})
    first = np.mean([l for _, l in result.history[:5]])
    last = np.mean([l for _, l in result.history[-5:]])
    assert result.step == 40 and last < 0.5 * first
    assert [p[0] for p in progress] == list(range(1, 41)) and progress[-1][1] == 40
    assert validated == [20, 40]
    assert [s for s, _ in loop.list_checkpoints(tmp_path / "ckpt")] == [30, 40]  # keeps the newest 2
    assert (tmp_path / "loss_curve.png").is_file() and any((tmp_path / "logs").iterdir())


def test_interrupt_then_resume_gives_the_uninterrupted_weights(tmp_path):
    _, straight = _toy_run(tmp_path / "a", steps=7)
    calls = {"n": 0}

    def interrupt_at_micro_14():  # mid accumulation window of step 5
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "b", steps=7, check_interrupt=interrupt_at_micro_14)
    assert [s for s, _ in loop.list_checkpoints(tmp_path / "b" / "ckpt")][-1] == 4
    result, resumed = _toy_run(tmp_path / "b", steps=7, resume=True)
    assert result.step == 7 and len(result.history) == 7
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_graceful_stop_and_shape_mismatch_on_resume(tmp_path):
    result, _ = _toy_run(tmp_path, steps=9, check_interrupt=lambda: loop_calls.append(1) or len(loop_calls) > 7)
    assert result.interrupted and result.step == 2 and result.checkpoint.endswith("checkpoint-0000002")
    with pytest.raises(ValueError, match="skip or repeat"):
        model = _Toy()
        params = lora.inject_lora(model, ["proj", "out"], rank=4, alpha=4)
        config = loop.LoopConfig(steps=9, batch_size=1, grad_accum=3, checkpoint_dir=str(tmp_path / "ckpt"))
        loop.train(_toy_step, params, _Regression(), config, model=model, resume=True,
                   collate_fn=torch.utils.data.default_collate)


loop_calls = []


def test_training_steps_run_without_cudnn_attention_and_restore_it():
    """The loop's attention guard: inside every micro-step (forward and backward) cuDNN SDPA is off."""
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", torch.backends.cuda.cudnn_sdp_enabled()))
            return grad

    def step(model, batch, generator):
        seen.append(("forward", torch.backends.cuda.cudnn_sdp_enabled()))
        return Spy.apply(_toy_step(model, batch, generator))  # its backward runs inside the step's backward

    model = _Toy()
    params = lora.inject_lora(model, ["proj", "out"], rank=2, alpha=2)
    torch.backends.cuda.enable_cudnn_sdp(True)
    loop.train(step, params, _Regression(), loop.LoopConfig(steps=2, grad_accum=2, mixed_precision="no"),
               model=model, collate_fn=torch.utils.data.default_collate)
    assert len(seen) == 8 and not any(enabled for _, enabled in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_eight_bit_adam_without_gpu_is_a_clear_error():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="8-bit Adam"):
        loop.make_optimizer([param], loop.LoopConfig(steps=1, optimizer="adamw8bit"), 1e-3)


def test_key_batches_shard_global_positions():
    one = loop.KeyBatches(5, seed=1, batch_size=2)
    two = [loop.KeyBatches(5, seed=1, batch_size=2, rank=r, world=2) for r in range(2)]
    flat = [k for m in range(4) for k in one.batch_keys(m)]
    sharded = [k for m in range(2) for r in range(2) for k in two[r].batch_keys(m)]
    assert flat == sharded
    epoch = [i for i, _ in flat[:5]]
    assert sorted(epoch) == list(range(5))
