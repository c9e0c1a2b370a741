"""SD-inpainting trainer (SmartEraser RG + VG, epsilon / CRO) on tiny random weights, CPU."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.erasers import layout, smarteraser
from erasekit.train import loop, sd_inpaint
from erasekit.train.datasets import PairedCropDataset, collate

_spec = importlib.util.spec_from_file_location("tiny_sd_inpaint_train",
                                               Path(__file__).parent / "comfy" / "tiny" / "sd_inpaint_train.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

SIZE = 64


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    model_dir = tiny.build_sd_inpaint_folder(root / "sd-inpaint")
    vision = tiny.build_clip_vision_file(root / "clip_vision.safetensors")
    return {"model": os.fspath(model_dir), "vision": os.fspath(vision)}


def synthetic_triplets(count=4, size=SIZE, seed=0):
    """Smooth backgrounds (targets) with a flat-coloured disc pasted on them (sources)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    samples = []
    for _ in range(count):
        base = rng.uniform(40, 215, 3)
        ramp = rng.uniform(-1, 1, (2, 3))
        target = base + ramp[0] * (xx[..., None] - size / 2) + ramp[1] * (yy[..., None] - size / 2)
        target = np.clip(target, 0, 255).astype(np.uint8)
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2
        source = target.copy()
        source[mask] = rng.integers(0, 256, 3)
        samples.append({"source": source, "mask": mask, "target": target})
    return samples


def make_model(weights, **options):
    opts = sd_inpaint.SDInpaintOptions(**options)
    model = sd_inpaint.load_model(weights["model"], opts, weights["vision"])
    return model, opts


def one_batch(count=2, seed=0):
    ds = PairedCropDataset(synthetic_triplets(count, seed=seed), SIZE, seed=seed)
    return collate([ds[(i, 0)] for i in range(count)])


def capture_unet(model):
    """Record the UNet's inputs on every call."""
    calls = []
    forward = model.unet.forward

    def recording(sample, timestep, encoder_hidden_states=None, **kwargs):
        calls.append({"sample": sample.detach().clone(), "hidden": encoder_hidden_states.detach().clone(),
                      "t": timestep})
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    model.unet.forward = recording
    return calls


def capture_encodes(model):
    """Record every (pixels, latents) the VAE step encodes, in call order."""
    calls = []
    encode = model.encode_images

    def recording(images, generator, *args):
        latents = encode(images, generator, *args)
        calls.append((images.detach().clone(), latents.detach().clone()))
        return latents

    model.encode_images = recording
    return calls


# ---------------------------------------------------------------------------------------------- RG / VG

def test_rg_batch_feeds_the_unmasked_source_latent(weights):
    model, _ = make_model(weights, condition_dropout=0.0)
    batch = one_batch()
    unet_calls, encodes = capture_unet(model), capture_encodes(model)
    model(batch, torch.Generator().manual_seed(0))
    (target_pixels, _), (source_pixels, source_latents) = encodes
    assert torch.equal(source_pixels, batch["source"]) and torch.equal(target_pixels, batch["target"])
    assert len(encodes) == 2  # RG needs no separate masked-image encoding
    sample = unet_calls[0]["sample"]
    assert sample.shape == (2, 9, SIZE // 8, SIZE // 8)
    assert torch.equal(sample[:, 5:9], source_latents)  # the whole source, object included
    assert torch.equal(sample[:, 4:5], layout.latent_mask(batch["mask"], SIZE // 8, SIZE // 8))
    # The object is visible in the condition: its pixels differ from the clean target inside the mask.
    inside = batch["mask"].bool()
    assert (batch["source"][inside] - batch["target"][inside]).abs().mean() > 0.05


def test_masked_condition_is_the_ordinary_inpainting_layout(weights):
    model, _ = make_model(weights, condition_dropout=0.0, image_condition="masked")
    batch = one_batch()
    unet_calls, encodes = capture_unet(model), capture_encodes(model)
    model(batch, torch.Generator().manual_seed(0))
    masked_pixels, masked_latents = encodes[2]
    inside = batch["mask"].bool()
    assert torch.all(masked_pixels[inside] == 0.5)  # gray = 0 in [-1, 1], as diffusers' masked_image
    assert torch.equal(masked_pixels[~inside], batch["source"][~inside])
    assert torch.equal(unet_calls[0]["sample"][:, 5:9], masked_latents)


def test_vg_context_is_the_smarteraser_splice(weights):
    model, opts = make_model(weights, condition_dropout=0.0)
    batch = one_batch()
    calls = capture_unet(model)
    with torch.no_grad():
        model(batch, torch.Generator().manual_seed(0))
        ids = model.tokenizer(opts.prompt, max_length=7, padding="max_length", return_tensors="pt").input_ids
        assert model.tokenizer.convert_ids_to_tokens(ids[0])[-2] == "object</w>"
        hidden = model.text_encoder(ids).last_hidden_state
        crops = [smarteraser.clip_pixel_values(smarteraser.white_instance_crop(s, m))
                 for s, m in zip(batch["source"], batch["mask"])]
        embeds = model.vision(pixel_values=torch.cat(crops)).image_embeds
        expected = smarteraser.splice_conditional(hidden.expand(2, -1, -1), model.projector(embeds).unsqueeze(1))
    context = calls[0]["hidden"]
    assert context.shape == (2, 7, tiny.WIDTH)
    assert torch.allclose(context, expected, atol=1e-5)


def test_condition_dropout_trains_the_unconditional_branch(weights):
    model, _ = make_model(weights, condition_dropout=1.0)
    calls = capture_unet(model)
    with torch.no_grad():
        model(one_batch(), torch.Generator().manual_seed(0))
        empty = model.tokenizer("", max_length=7, padding="max_length", return_tensors="pt").input_ids
        hidden = model.text_encoder(empty).last_hidden_state
        zero = model.projector(model.vision(pixel_values=smarteraser.zero_pixel_values()).image_embeds).unsqueeze(1)
        expected = smarteraser.splice_unconditional(hidden, zero).expand(2, -1, -1)
    assert torch.allclose(calls[0]["hidden"], expected, atol=1e-5)


def test_dropout_rate_is_per_batch_at_the_official_rate():
    assert sd_inpaint.SDInpaintOptions().condition_dropout == 0.1
    draws = [sd_inpaint.draws_unconditional(torch.Generator().manual_seed(s), 0.1) for s in range(2000)]
    assert 0.08 < np.mean(draws) < 0.12
    assert not any(sd_inpaint.draws_unconditional(torch.Generator().manual_seed(s), 0.0) for s in range(200))
    assert all(sd_inpaint.draws_unconditional(torch.Generator().manual_seed(s), 1.0) for s in range(200))


def test_projector_gets_gradients_and_clip_vision_does_not(weights):
    model, opts = make_model(weights, condition_dropout=0.0)
    params = sd_inpaint.trainable_parameters(model, opts)
    loss = model(one_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert model.projector.fc_out.weight.grad.abs().sum() > 0
    assert model.projector.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.vae.parameters())
    assert model.unet.conv_in.weight.grad.abs().sum() > 0
    q_proj = next(p for n, p in model.text_encoder.named_parameters() if n.endswith("self_attn.q_proj.weight"))
    assert q_proj.grad.abs().sum() > 0
    assert not any(n.startswith(("vision", "vae")) for n in params)
    assert {n.split(".")[0] for n in params} == {"unet", "text_encoder", "projector"}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_frozen_text_encoder_is_neither_trained_nor_differentiated(weights, mode):
    """``train_text_encoder=False``: no text-encoder parameter is trained, none gets a gradient, and its forward
    keeps no graph; the UNet and the projector still learn."""
    model, opts = make_model(weights, condition_dropout=0.0, mode=mode, lora_rank=4, train_text_encoder=False)
    params = sd_inpaint.trainable_parameters(model, opts)
    assert {n.split(".")[0] for n in params} == {"unet", "projector"}
    outputs = []
    model.text_encoder.register_forward_hook(lambda _m, _a, out: outputs.append(out.last_hidden_state))
    model(one_batch(), torch.Generator().manual_seed(0)).backward()
    assert outputs and not outputs[0].requires_grad  # no graph kept through the frozen encoder
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert model.projector.fc_out.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in params.items() if n.startswith("unet.") and "lora_A" in n) or mode == "full"


def test_bad_models_and_inputs_raise_clear_errors(weights, tmp_path):
    model, _ = make_model(weights)
    batch = one_batch()
    batch["mask"] = batch["mask"][:, :40]
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(batch, torch.Generator())
    odd = collate([PairedCropDataset(synthetic_triplets(1, size=48), 48)[(0, 0)]])
    odd["source"], odd["target"], odd["mask"] = odd["source"][:, :44], odd["target"][:, :44], odd["mask"][:, :44]
    with pytest.raises(ValueError, match="multiples of 8"):
        model(odd, torch.Generator())
    with pytest.raises(ValueError, match="objective"):
        sd_inpaint.SDInpaintOptions(objective="v").check()
    with pytest.raises(FileNotFoundError, match="no unet/"):
        os.makedirs(tmp_path / "empty")
        sd_inpaint.load_model(os.fspath(tmp_path / "empty"), sd_inpaint.SDInpaintOptions(), weights["vision"])
    with pytest.raises(ValueError, match="CLIP vision"):
        sd_inpaint.load_model(weights["model"], sd_inpaint.SDInpaintOptions())
    from diffusers import UNet2DConditionModel

    four = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=tiny.WIDTH, attention_head_dim=8, norm_num_groups=8)
    with pytest.raises(ValueError, match="4 input channels"):
        sd_inpaint.SDInpaintModel(four, model.vae, model.text_encoder, model.tokenizer, model.alphas_cumprod,
                                  sd_inpaint.SDInpaintOptions(), model.vision, model.projector)


# ---------------------------------------------------------------------------------------------- training

def run_training(weights, out, steps, objective="epsilon", mode="full", lr=2e-3, resume=False,
                 check_interrupt=None, checkpoint_every=2, comfy_name=None, dataset=None, cache_latents=0):
    config = loop.LoopConfig(steps=steps, batch_size=2, learning_rate=lr, mixed_precision="no", seed=0,
                             checkpoint_every=checkpoint_every, keep_checkpoints=2)
    options = sd_inpaint.SDInpaintOptions(objective=objective, mode=mode, lora_rank=4, lora_alpha=4)
    dataset = dataset or PairedCropDataset(synthetic_triplets(4), SIZE, seed=0)
    return sd_inpaint.train_sd_inpaint(weights["model"], dataset, os.fspath(out), config, options,
                                       clip_vision=weights["vision"], resolution=SIZE, resume=resume,
                                       check_interrupt=check_interrupt, comfy_name=comfy_name,
                                       cache_latents=cache_latents)


def heldout_loss(model, batch, seeds=range(6)):
    """The objective at fixed noise, timesteps and dropout draws: comparable before and after training."""
    with torch.no_grad():
        return float(np.mean([model(batch, torch.Generator().manual_seed(1000 + s)).item() for s in seeds]))


# CRO's loss is flatter (ε errors are scaled by the short jump's small coefficient): more steps, smaller drop
@pytest.mark.parametrize("objective, steps, ratio", [("epsilon", 12, 0.85), ("cro", 20, 0.9)])
def test_loss_falls(weights, tmp_path, objective, steps, ratio):
    triplets = synthetic_triplets(4)
    dataset = PairedCropDataset(triplets, SIZE, seed=0)
    batch = collate([dataset[(i, 0)] for i in range(4)])
    before_model, _ = make_model(weights, objective=objective)
    before = heldout_loss(before_model, batch)
    out = run_training(weights, tmp_path, steps=steps, objective=objective, checkpoint_every=0, dataset=dataset)
    after = heldout_loss(out["model"], batch)
    assert after < ratio * before, (objective, before, after)
    assert len(out["result"].history) == steps
    assert os.path.isfile(out["loss_curve"])
    assert os.path.isfile(os.path.join(out["export"]["folder"], sd_inpaint.PROJECTOR_FILE))


def trainable_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_kill_and_resume_gives_identical_weights(weights, tmp_path):
    straight = run_training(weights, tmp_path / "straight", steps=4, objective="cro")["model"]

    class Kill(Exception):
        pass

    seen = []

    def kill_after_two_steps():
        seen.append(1)
        if len(seen) > 2:  # the loop asks before every micro-batch: the third ask is step 3
            raise Kill()
        return False

    with pytest.raises(Kill):
        run_training(weights, tmp_path / "killed", steps=4, objective="cro", check_interrupt=kill_after_two_steps)
    assert [s for s, _ in loop.list_checkpoints(tmp_path / "killed" / "checkpoints")] == [2]
    resumed = run_training(weights, tmp_path / "killed", steps=4, objective="cro", resume=True)
    assert resumed["result"].step == 4
    a, b = trainable_snapshot(straight), trainable_snapshot(resumed["model"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert [s for s, _ in resumed["result"].history] == [1, 2, 3, 4]


def smarteraser_prediction(folder, vision_path, source, mask, x_t, timestep):
    """The SmartEraser inference conditioning path on a saved folder: ε of the conditional branch."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    projector_path = os.path.join(folder, sd_inpaint.PROJECTOR_FILE)
    projector = smarteraser.load_projector(projector_path) if os.path.isfile(projector_path) \
        else sd_inpaint.new_projector(tiny.WIDTH, 0)
    vision = sd_inpaint.load_clip_vision(vision_path)
    with torch.no_grad():
        ids = tokenizer(smarteraser.DEFAULT_PROMPT, max_length=7, padding="max_length", return_tensors="pt").input_ids
        hidden = text_encoder(ids).last_hidden_state
        pixels = smarteraser.clip_pixel_values(smarteraser.white_instance_crop(source[0], mask[0]))
        token = smarteraser.image_tokens(vision(pixel_values=pixels).image_embeds, projector)
        context = smarteraser.splice_conditional(hidden, token)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"))
        latent = vae.encode(source.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        model_input = torch.cat([x_t, layout.latent_mask(mask, *latent.shape[-2:]), latent], dim=1)
        return unet(model_input, timestep, encoder_hidden_states=context).sample


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trained_result_loads_into_the_smarteraser_path_and_changes_its_prediction(weights, tmp_path, mode):
    out = run_training(weights, tmp_path, steps=6, mode=mode, checkpoint_every=0, comfy_name="trained",
                       lr=5e-3)
    folder = out["export"]["folder"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(folder, part)), part
    batch = one_batch(1, seed=3)
    x_t = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    before = smarteraser_prediction(weights["model"], weights["vision"], batch["source"], batch["mask"], x_t, t)
    after = smarteraser_prediction(folder, weights["vision"], batch["source"], batch["mask"], x_t, t)
    assert (after - before).abs().mean() > 1e-3
    # the saved weights are the trained ones: the in-memory model (LoRA included) predicts the same
    model = out["model"].eval()
    with torch.no_grad():
        ids = model.token_ids(smarteraser.DEFAULT_PROMPT, "cpu")
        hidden = model.text_encoder(ids).last_hidden_state
        token = model.image_token(model.visual_pixels(batch["source"], batch["mask"]))
        context = smarteraser.splice_conditional(hidden, token)
        vae_latent = model.vae.encode(batch["source"].permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * model.scaling_factor
        model_input = torch.cat([x_t, layout.latent_mask(batch["mask"], SIZE // 8, SIZE // 8), vae_latent], 1)
        live = model.unet(model_input, t, encoder_hidden_states=context).sample
    assert torch.allclose(live, after, atol=1e-4)
    # the ComfyUI files of the converter (checkpoint + projector) are written next to the folder
    from safetensors.torch import load_file

    checkpoint = load_file(out["export"]["checkpoint"])
    assert any(k.startswith("model.diffusion_model.input_blocks.0.0.weight") for k in checkpoint)
    assert checkpoint["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    smarteraser.read_projector_state_dict(out["export"]["projector"])
    if mode == "lora":
        lora = load_file(os.path.join(folder, sd_inpaint.LORA_FILE))
        assert any(k.startswith("unet.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)


def test_training_on_a_real_triplet_folder_via_the_command(weights, tmp_path, shared_data):
    """erasekit-train sd-inpaint on SmartEraser's own example triplets, written as a triplet dataset."""
    from PIL import Image

    from erasekit.dataset_tools.triplets import TripletWriter
    from erasekit.train import cli

    root = shared_data / "images" / "syn_triplets"
    data = tmp_path / "triplets"
    with TripletWriter(data) as writer:
        for path in sorted((root / "paste").glob("*.jpg")):
            def read(folder, mode):
                return np.asarray(Image.open(root / folder / path.name).convert(mode).resize((96, 96), Image.BILINEAR))

            mask = read("mask", "L") > 127
            writer.write(path.stem.replace(" ", "_"), read("paste", "RGB"), mask, read("gt", "RGB"),
                         {"origin": {"kind": "image", "image": path.name, "instance": 0}})
    code = cli.main(["sd-inpaint", "--model", weights["model"], "--clip-vision", weights["vision"], "--data",
                     os.fspath(data), "--output", os.fspath(tmp_path / "out"), "--steps", "3", "--resolution",
                     "64", "--batch-size", "1", "--mixed-precision", "no", "--objective", "cro",
                     "--checkpoint-every", "2", "--comfy-name", "erased"])
    assert code == 0
    assert os.path.isfile(tmp_path / "out" / "loss_curve.png")
    assert os.path.isfile(tmp_path / "out" / "erased.safetensors")
    assert os.path.isfile(tmp_path / "out" / "model" / sd_inpaint.PROJECTOR_FILE)
    assert [s for s, _ in loop.list_checkpoints(tmp_path / "out" / "checkpoints")] == [2, 3]


def test_clip_vision_loads_from_one_comfyui_style_file(weights, tmp_path):
    from safetensors.torch import save_file

    reference = tiny.tiny_clip_vision()
    loaded = sd_inpaint.load_clip_vision(weights["vision"])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=pixels).image_embeds, reference(pixel_values=pixels).image_embeds,
                              atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not a CLIP vision model with projection"):
        sd_inpaint.load_clip_vision(os.fspath(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError):
        sd_inpaint.load_clip_vision(os.fspath(tmp_path / "absent.safetensors"))


def test_cached_latents_and_clip_embeds_train_exactly_like_uncached(weights, tmp_path):
    dataset = PairedCropDataset(synthetic_triplets(2), SIZE, seed=0, variants=2)
    plain = run_training(weights, tmp_path / "plain", steps=4, objective="cro", checkpoint_every=0, dataset=dataset)
    cached = run_training(weights, tmp_path / "cached", steps=4, objective="cro", checkpoint_every=0, dataset=dataset,
                          cache_latents=2)
    cache = cached["model"].latent_cache
    assert cache.hits > 0 and len(cache) == 3 * 4  # target, source and CLIP embeds of 2 samples × 2 variants
    a, b = [v for _, v in plain["result"].history], [v for _, v in cached["result"].history]
    assert np.allclose(a, b, rtol=1e-4, atol=1e-7), (a, b)
