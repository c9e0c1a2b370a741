"""SmartEraser through a real ComfyUI: loading the release folder, parity of the conditioned SD1.5-inpaint
noise prediction with diffusers' UNet given the official inputs, the converter's checkpoint, and bad input."""
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tiny import smarteraser as tiny

from erasekit.erasers import smarteraser as se
from erasekit.erasers.smarteraser_convert import convert

PROMPT = "Remove the instance of"
TIMESTEP = 500


def _clip_processor():
    """Hugging Face's CLIP image processor with openai/clip-vit-large-patch14's preprocessor_config.json.

    The official code ran transformers 4.37.2 (requirements.txt), whose CLIPImageProcessor resized with PIL;
    transformers 5 keeps that implementation as CLIPImageProcessorPil (its default CLIPImageProcessor resamples
    with torchvision, about one 8-bit level apart)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                              crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)


CLIP_PROCESSOR = _clip_processor()


@pytest.fixture(scope="module")
def nodes(comfy):
    return importlib.import_module(comfy.pack_module().__name__ + ".nodes.smarteraser")


@pytest.fixture(scope="module")
def release(comfy):
    """A tiny SmartEraser release folder in models/smarteraser (fp32: parity needs it)."""
    folder = comfy.models_dir / "smarteraser" / "tiny_release"
    if not (folder / "unet").is_dir():
        tiny.build_diffusers_folder(folder, full_size_clip=True)
    return folder


@pytest.fixture(scope="module")
def fp32_text_encoders(comfy):
    """ComfyUI runs text and CLIP vision encoders in fp16 even on CPU; parity is checked in fp32 (--fp32-text-enc)."""
    from comfy.cli_args import args

    before, args.fp32_text_enc = args.fp32_text_enc, True
    yield
    args.fp32_text_enc = before


@pytest.fixture(scope="module")
def loaded(nodes, release, fp32_text_encoders):
    return nodes.load_release(str(release))


@pytest.fixture(scope="module")
def vision(tmp_path_factory, fp32_text_encoders):
    """The same tiny CLIP vision model in transformers and in ComfyUI's ClipVisionModel."""
    import comfy.clip_vision

    reference = tiny.clip_vision(full_size=False)
    config = reference.config.to_dict()
    config.update(model_type="clip_vision_model", image_size=224)
    path = tmp_path_factory.mktemp("clip_vision") / "config.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if isinstance(v, (int, float, str))}))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    missing, unexpected = model.load_sd(reference.state_dict())
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    return reference, model


def scene(size=64):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[20:44, 12:40] = 255
    mask[30:34, 16:20] = 0
    return pixels, mask


def official_embeds(release, reference_vision, pixels, mask):
    """prompt_embeds / negative_prompt_embeds exactly as app_remove.py builds them (CLIPVisualPrompt.inference_vtoken)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    text_encoder = CLIPTextModel.from_pretrained(str(release / "text_encoder")).eval()
    mlp = torch.load(release / "clip_mlp_weight.pth", weights_only=True)

    def im2text(x):
        return x + torch.nn.functional.linear(
            torch.nn.functional.layer_norm(x, (768,), mlp["norm.weight"], mlp["norm.bias"]), mlp["fc_out.weight"], mlp["fc_out.bias"])

    mask_image = Image.fromarray(((mask > 128) * 255).astype(np.uint8))
    inverted = ImageOps.invert(mask_image)
    white = inverted.point(lambda x: 255 if x == 255 else 0)
    crop = Image.composite(white, Image.fromarray(pixels), inverted).convert("RGB").crop(mask_image.getbbox())
    image = CLIP_PROCESSOR(images=crop, return_tensors="pt")["pixel_values"]  # as app_remove.py, not the pack's
    with torch.no_grad():
        ids = tokenizer(PROMPT, padding="max_length", max_length=7, truncation=True, return_tensors="pt")["input_ids"]
        ids_uncond = tokenizer("", padding="max_length", max_length=7, truncation=True, return_tensors="pt")["input_ids"]
        text = text_encoder(ids).last_hidden_state
        uncond_text = text_encoder(ids_uncond).last_hidden_state
        token = im2text(reference_vision(image).image_embeds.unsqueeze(1))
        zero = im2text(reference_vision(torch.zeros_like(image)).image_embeds.unsqueeze(1))
    cond = torch.cat((text[:, :-2, :], token, text[:, -1, :].unsqueeze(1)), dim=1)
    uncond = torch.cat((uncond_text[:, 0, :].unsqueeze(1), zero, uncond_text[:, 1:-1, :]), dim=1)
    return cond, uncond


def tiny_tokenizer_dir():
    import comfy.sd1_clip
    from pathlib import Path

    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"


def diffusers_eps(release, x_t, mask_latent, image_latents, embeds):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(release / "unet")).eval()
    with torch.no_grad():
        return unet(torch.cat([x_t, mask_latent, image_latents], dim=1), TIMESTEP, encoder_hidden_states=embeds).sample


def comfy_eps(model, conditioning, x_t):
    """ε of ComfyUI's model for one conditioning, through extra_conds (the concat path) and apply_model."""
    base = model.model
    sigma = base.model_sampling.sigma(torch.tensor([float(TIMESTEP)]))
    x = x_t * torch.sqrt(1 + sigma ** 2)  # ComfyUI's EPS input scaling: calculate_input divides it back
    cond, values = conditioning[0]
    extra = base.extra_conds(noise=x, device=x.device, latent_image=torch.zeros_like(x), denoise_mask=None,
                             cross_attn=cond, **values)
    assert base.model_sampling.timestep(sigma).item() == TIMESTEP
    with torch.no_grad():
        denoised = base.apply_model(x, sigma, c_concat=extra["c_concat"].cond, c_crossattn=extra["c_crossattn"].cond)
    return (x - denoised) / sigma.view(-1, 1, 1, 1)


def test_parity_with_diffusers_inpaint_unet(nodes, loaded, release, vision):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    model, clip, vae, projector = loaded
    reference_vision, comfy_vision = vision
    pixels, mask = scene()
    image = torch.from_numpy(pixels).float().unsqueeze(0) / 255
    mask_t = torch.from_numpy(mask).float().unsqueeze(0) / 255

    _, positive, negative, latent, used = nodes.SmartEraserConditioning.execute(
        model, clip, vae, projector, image, mask_t, comfy_vision, "demo", "ignored by the demo preset", 4.0).args
    assert positive[0][0].shape == negative[0][0].shape == (1, 7, 768)
    assert latent["samples"].shape == (1, 4, 8, 8) and torch.equal(used, mask_t)

    # the official inputs: masked_image_latents = VAE latent of the whole unmasked image, mask binarised + nearest
    diff_vae = AutoencoderKL.from_pretrained(str(release / "vae")).eval()
    with torch.no_grad():
        image_latents = diff_vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode() * diff_vae.config.scaling_factor
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask_latent = torch.nn.functional.interpolate(processor.preprocess(Image.fromarray(mask), height=64, width=64), size=(8, 8))
    cond_embeds, uncond_embeds = official_embeds(release, reference_vision, pixels, mask)

    assert (positive[0][0] - cond_embeds).abs().max() < 1e-4
    assert (negative[0][0] - uncond_embeds).abs().max() < 1e-4
    torch.manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8)
    for branch, conditioning, embeds in (("cond", positive, cond_embeds), ("uncond", negative, uncond_embeds)):
        ours = comfy_eps(model, conditioning, x_t)
        theirs = diffusers_eps(release, x_t, mask_latent, image_latents, embeds)
        difference = (ours - theirs).abs().max().item()
        print(f"SmartEraser parity, {branch} branch: max |eps_comfy - eps_diffusers| = {difference:.2e} (|eps| max {theirs.abs().max().item():.2f})")
        assert difference <= 1e-4, f"{branch} noise prediction differs from diffusers' by {difference}"
    # RG really matters: the concat carries the unmasked image, not image * (1 - mask)
    assert (positive[0][1]["concat_latent_image"] * 0.18215 - image_latents).abs().max() < 1e-4


def test_text_context_is_the_seven_token_encoding(nodes, loaded, release):
    from transformers import CLIPTextModel, CLIPTokenizer

    _, clip, _, _ = loaded
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    text_encoder = CLIPTextModel.from_pretrained(str(release / "text_encoder")).eval()
    for prompt in (PROMPT, "Remove the instance of object", "remove the big red car on the left side", ""):
        ids = tokenizer(prompt, padding="max_length", max_length=7, truncation=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = text_encoder(ids).last_hidden_state
        assert (nodes.text_context(clip, prompt) - expected).abs().max() < 1e-4, prompt


def test_converted_checkpoint_loads_like_the_release_folder(comfy, loaded, release, tmp_path):
    import comfy.sd

    model, clip, vae, _ = loaded
    checkpoint, projector = convert(str(release), str(tmp_path), name="se")
    ck_model, ck_clip, ck_vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    ours, theirs = model.model.diffusion_model.state_dict(), ck_model.model.diffusion_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokens = clip.tokenize("Remove the instance of")
    assert torch.equal(clip.encode_from_tokens(tokens), ck_clip.encode_from_tokens(tokens))
    image = torch.rand(1, 64, 64, 3)
    assert torch.equal(vae.encode(image), ck_vae.encode(image))
    assert se.load_projector(projector).state_dict().keys() == se.PROJECTOR_KEYS.keys()


def test_loader_nodes_through_the_executor(comfy, nodes, release):
    comfy.ensure_model("smarteraser", tiny.PROJECTOR)
    prompt = {
        "1": {"class_type": "EraseKitSmartEraserLoader", "inputs": {"folder": release.name}},
        "2": {"class_type": "EraseKitSmartEraserProjectorLoader", "inputs": {"projector_name": tiny.PROJECTOR}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "x"}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }
    listed = nodes.projector_files()  # the release folder's unet/vae/text_encoder weights are not offered
    assert tiny.PROJECTOR in listed and not [f for f in listed if "tiny_release" in f and "clip_mlp" not in f]
    assert release.name in nodes.release_folders()
    result = comfy.run_prompt(prompt)
    model, clip, vae, projector = result.outputs("1")
    assert model.model.model_config.unet_config["in_channels"] == 9
    assert type(result.outputs("2")[0]).__name__ == "Im2TextProjector"  # the pack is imported under ComfyUI's module name


def test_plain_four_channel_unet_is_refused(nodes, comfy, tmp_path):
    import comfy.sd

    unet = tiny.tiny_unet(in_channels=4).state_dict()
    from erasekit.erasers.smarteraser_convert import unet_diffusers_to_ldm_keys
    keys = unet_diffusers_to_ldm_keys(unet)
    plain = comfy.sd.load_diffusion_model_state_dict({keys[k]: v for k, v in unet.items()})
    with pytest.raises(ValueError, match="4 input channels.*plain 4-channel SD1.5"):
        nodes.check_smarteraser_model(plain)
    with pytest.raises(ValueError, match="4-channel UNet; SmartEraser needs the 9-channel"):
        torch.save(unet, tmp_path / "diffusion_pytorch_model.bin")
        nodes.load_unet(str(tmp_path / "diffusion_pytorch_model.bin"))


def test_wrong_projector_and_bad_sizes_are_explained(nodes, comfy, loaded):
    from safetensors.torch import save_file

    bad = comfy.models_dir / "smarteraser" / "bad_projector.safetensors"
    save_file({"fc_out.weight": torch.zeros(1024, 768), "fc_out.bias": torch.zeros(1024)}, str(bad))
    with pytest.raises(ValueError, match=r"found fc_out.bias \[1024\], fc_out.weight \[1024, 768\]; needed exactly"):
        nodes.SmartEraserProjectorLoader.execute("bad_projector.safetensors")
    with pytest.raises(FileNotFoundError, match="'absent.safetensors' was not found in ComfyUI's 'smarteraser' folder"):
        nodes.SmartEraserProjectorLoader.execute("absent.safetensors")
    model, clip, vae, projector = loaded
    image, mask = torch.rand(1, 64, 64, 3), torch.zeros(1, 64, 64)
    mask[:, 8:24, 8:24] = 1
    with pytest.raises(ValueError, match="multiples of 8"):
        nodes.SmartEraserConditioning.execute(model, clip, vae, projector, image[:, :60], mask[:, :60], object(),
                                              "demo", PROMPT, 1.0)


def test_clip_vision_is_a_required_input(comfy):
    """The graph validator, not the node, flags a SmartEraser Conditioning without a CLIP vision model."""
    info = comfy.object_info["EraseKitSmartEraserConditioning"]["input"]
    assert "clip_vision" in info["required"] and "clip_vision" not in info.get("optional", {})


def test_presets_run_the_official_prompt_and_mask(nodes, loaded, vision):
    """demo: 'Remove the instance of', the mask as given; evaluation: '... object' and the official dilation loop
    (test-mode choice 3); custom: the widgets."""
    model, clip, vae, projector = loaded
    _, comfy_vision = vision
    pixels, mask = scene()
    image = torch.from_numpy(pixels).float().unsqueeze(0) / 255
    mask_t = torch.from_numpy(mask).float().unsqueeze(0) / 255

    def run(preset, prompt="a cat", ratio=1.5):
        return nodes.SmartEraserConditioning.execute(model, clip, vae, projector, image, mask_t, comfy_vision, preset,
                                                     prompt, ratio).args

    def words_of(conditioning):  # the 7-token context without the image token at position -2
        context = conditioning[0][0]
        return torch.cat([context[:, :-2], context[:, -1:]], dim=1)

    def words(prompt):
        hidden = nodes.text_context(clip, prompt)
        return torch.cat([hidden[:, :-2], hidden[:, -1:]], dim=1)

    _, demo, _, _, demo_mask = run("demo")
    assert torch.equal(demo_mask, mask_t)
    assert (words_of(demo) - words(se.DEFAULT_PROMPT)).abs().max() < 1e-5
    _, evaluation, _, _, eval_mask = run("evaluation")
    assert torch.equal(eval_mask, se.evaluation_mask(mask_t))
    assert 1.10 <= eval_mask.sum() / (mask_t > 0.5).sum() < 1.6
    assert (words_of(evaluation) - words(se.EVAL_PROMPT)).abs().max() < 1e-5
    assert not torch.allclose(words_of(demo), words_of(evaluation), atol=1e-3)
    _, custom, _, _, custom_mask = run("custom")
    assert custom_mask.sum() == round(1.5 * float((mask_t > 0.5).sum()))
    assert (words_of(custom) - words("a cat")).abs().max() < 1e-5
