"""SmartEraser core: the 7-token splice, the white-background crop, CLIP preprocessing, RG mask, projector
loading, the official 512 crop and the diffusers-folder converter (no ComfyUI)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from erasekit.erasers import layout
from erasekit.erasers import smarteraser as se
from erasekit.erasers import smarteraser_convert as conv
from erasekit.erasers.crop_stitch import stitch

TINY = Path(__file__).resolve().parent / "comfy" / "tiny" / "smarteraser.py"


def tiny_module():
    spec = importlib.util.spec_from_file_location("erasekit_tiny_smarteraser_unit", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- splice
def numbered_hidden(batch=1):
    """Hidden states whose every value is its token position, so positions can be read back."""
    return torch.arange(se.CONTEXT_TOKENS, dtype=torch.float32).view(1, -1, 1).expand(batch, -1, 4).clone()


def test_conditional_splice_replaces_position_minus_two():
    out = se.splice_conditional(numbered_hidden(2), torch.full((1, 1, 4), -1.0))
    assert out.shape == (2, 7, 4)
    assert out[0, :, 0].tolist() == [0, 1, 2, 3, 4, -1, 6]


def test_unconditional_splice_inserts_after_bos_and_drops_last():
    out = se.splice_unconditional(numbered_hidden(), torch.full((1, 1, 4), -1.0))
    assert out.shape == (1, 7, 4)
    assert out[0, :, 0].tolist() == [0, -1, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("tokens", [6, 8, 77])
def test_splice_rejects_contexts_that_are_not_seven_tokens(tokens):
    with pytest.raises(ValueError, match=r"\[B, 7, C\]; got \[1, %d, 4\]" % tokens):
        se.splice_conditional(torch.zeros(1, tokens, 4), torch.zeros(1, 1, 4))


def test_splice_rejects_token_of_wrong_width():
    with pytest.raises(ValueError, match=r"\[B, 1, 4\]; got \[1, 1, 5\]"):
        se.splice_unconditional(torch.zeros(1, 7, 4), torch.zeros(1, 1, 5))


def test_seven_token_ids_hand_made():
    bos, eos = 100, 200
    assert se.seven_token_ids([1, 2, 3, 4], bos, eos) == [100, 1, 2, 3, 4, 200, 200]  # demo prompt: 4 words
    assert se.seven_token_ids([1, 2, 3, 4, 5], bos, eos) == [100, 1, 2, 3, 4, 5, 200]  # training prompt
    assert se.seven_token_ids([], bos, eos) == [100, 200, 200, 200, 200, 200, 200]  # negative
    assert se.seven_token_ids([1, 2, 3, 4, 5, 6, 7], bos, eos) == [100, 1, 2, 3, 4, 5, 200]  # truncated


@pytest.mark.parametrize("prompt", ["Remove the instance of", "Remove the instance of object", "",
                                    "remove the big red car on the left side"])
def test_seven_token_ids_match_clip_tokenizer(prompt, comfyui_source):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(comfyui_source / "comfy" / "sd1_tokenizer"))
    official = tokenizer(prompt, padding="max_length", max_length=7, truncation=True)["input_ids"]
    words = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert se.seven_token_ids(words, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == official


# ------------------------------------------------------------------------------------------- white crop
def test_white_instance_crop_hand_made():
    image = torch.full((6, 8, 3), 0.25)
    image[2, 3] = torch.tensor([0.1, 0.2, 0.3])
    mask = torch.zeros(6, 8)
    mask[1:4, 2:6] = 1.0
    mask[1, 2] = 0.0  # a hole in the corner of the box becomes white
    mask[2, 3] = 0.6  # ≥ 0.5: on
    mask[3, 5] = 0.49  # < 0.5: off (the pack's one threshold, erasers/layout.py)
    crop = se.white_instance_crop(image, mask)
    assert crop.shape == (3, 4, 3)
    assert crop[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(crop[1, 1], torch.tensor([0.1, 0.2, 0.3]))
    assert crop[2, 3].tolist() == [1.0, 1.0, 1.0]
    assert torch.all(crop[0, 1] == 0.25)


def test_white_instance_crop_equals_the_demo_pil_code():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[5:30, 10:22] = 255
    mask[12:14, 12:20] = 0
    # the demo: gray2whiteblack, then crop_white_instance (app_remove.py)
    mask_image = Image.fromarray(((mask > 128) * 255).astype(np.uint8))
    inverted = ImageOps.invert(mask_image)
    white = inverted.point(lambda x: 255 if x == 255 else 0)
    expected = np.asarray(Image.composite(white, Image.fromarray(pixels), inverted).convert("RGB")
                          .crop(mask_image.getbbox()), np.float32) / 255
    ours = se.white_instance_crop(torch.from_numpy(pixels).float() / 255, torch.from_numpy(mask).float() / 255)
    assert np.abs(ours.numpy() - expected).max() < 1e-6


def test_white_instance_crop_rejects_empty_mask():
    with pytest.raises(ValueError, match="mask is empty"):
        se.white_instance_crop(torch.zeros(4, 4, 3), torch.zeros(4, 4))


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (300, 300)])
def test_clip_pixel_values_match_clip_image_processor(size):
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    ours = se.clip_pixel_values(torch.from_numpy(pixels).float() / 255)
    # transformers 4.37.2 (the official requirement) resized with PIL: transformers 5's CLIPImageProcessorPil
    settings = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    official = CLIPImageProcessorPil(**settings)(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    assert ours.shape == official.shape == (1, 3, 224, 224)
    assert torch.equal(ours, official)
    # transformers 5's default processor resamples with torchvision: a few 8-bit levels apart on random noise
    torchvision = CLIPImageProcessor(**settings)(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    assert (ours - torchvision).abs().mean() < 0.02


# ------------------------------------------------------------------------------------------- RG mask
def test_latent_mask_is_nearest_of_binarised_mask_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(2)
    mask = torch.from_numpy(rng.integers(0, 256, (1, 64, 48)).astype(np.float32) / 255)
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    binary = processor.preprocess(mask.unsqueeze(1), height=64, width=48)
    expected = torch.nn.functional.interpolate(binary, size=(8, 6))
    ours = layout.latent_mask(mask, 8, 6)
    # diffusers binarises at >= 0.5, the pack's one rule (erasers/layout.py)
    assert torch.equal(ours, expected)


def test_check_inpaint_size():
    se.check_inpaint_size(512, 504)
    with pytest.raises(ValueError, match="500x512.*multiples of 8"):
        se.check_inpaint_size(512, 500)


# ------------------------------------------------------------------------------------------- projector
def test_projector_is_residual_linear_of_layernorm():
    projector = se.Im2TextProjector()
    x = torch.randn(2, 768)
    expected = x + projector.fc_out(torch.nn.functional.layer_norm(x, (768,), projector.norm.weight, projector.norm.bias))
    assert torch.allclose(projector(x), expected)
    assert se.image_tokens(x, projector).shape == (2, 1, 768)


def test_projector_loads_from_pth_and_safetensors(tmp_path):
    state = se.Im2TextProjector().state_dict()
    torch.save(state, tmp_path / "clip_mlp_weight.pth")
    save_file(state, tmp_path / "p.safetensors")
    for name in ("clip_mlp_weight.pth", "p.safetensors"):
        loaded = se.load_projector(str(tmp_path / name))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_projector_pth_is_loaded_weights_only(tmp_path):
    from fractions import Fraction  # any non-tensor class: unpickling it would run arbitrary code paths

    torch.save({"fc_out.weight": Fraction(1, 2)}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only"):
        se.read_projector_state_dict(str(tmp_path / "evil.pth"))


def test_projector_of_wrong_shape_says_what_was_found(tmp_path):
    bad = {"fc_out.weight": torch.zeros(1024, 1024), "fc_out.bias": torch.zeros(1024),
           "norm.weight": torch.zeros(1024), "norm.bias": torch.zeros(1024)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"found fc_out.bias \[1024\].*needed exactly fc_out.weight \[768, 768\]"):
        se.load_projector(str(tmp_path / "bad.safetensors"))


def test_image_tokens_rejects_other_clip_widths():
    with pytest.raises(ValueError, match=r"clip-vit-large-patch14.*\[1, 1024\]"):
        se.image_tokens(torch.zeros(1, 1024), se.Im2TextProjector())


# ------------------------------------------------------------------------------------------- 512 crop
def demo_crop_box(mask_array, target=512):
    """The demo's resize_and_crop box, mapped back to original pixels."""
    h, w = mask_array.shape
    scale = target / min(w, h)
    new_w, new_h = int(w * scale), int(h * scale)
    resized = np.array(Image.fromarray(mask_array).resize((new_w, new_h), Image.Resampling.BILINEAR))
    ys, xs = np.where(resized > 0)
    x1 = max(0, min(xs.min() - (target - (xs.max() - xs.min())) // 2, new_w - target))
    y1 = max(0, min(ys.min() - (target - (ys.max() - ys.min())) // 2, new_h - target))
    return x1 / scale, y1 / scale


@pytest.mark.parametrize("shape,box", [((512, 768), (100, 50, 200, 300)), ((600, 400), (300, 20, 380, 100)),
                                       ((512, 512), (0, 0, 10, 10))])
def test_official_crop_box_matches_the_demo(shape, box):
    mask = np.zeros(shape, np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    mode, (cx0, cy0, cx1, cy1) = se.official_crop_box(torch.from_numpy(mask) > 0, *shape)
    assert mode == "crop" and cx1 - cx0 == cy1 - cy0 == min(shape)
    ex, ey = demo_crop_box(mask)
    assert abs(cx0 - ex) <= 2 and abs(cy0 - ey) <= 2


def test_official_crop_pads_when_mask_is_larger_than_short_side():
    mask = torch.zeros(1, 100, 300)
    mask[0, 10:90, 0:250] = 1
    crop, crop_mask, info = se.smarteraser_crop(torch.rand(1, 100, 300, 3), mask)
    assert crop.shape == (1, 512, 512, 3) and crop_mask.shape == (1, 512, 512)
    assert (info.resized_height, info.resized_width) == (171, 512)
    assert torch.all(crop[0, 171:] == 1.0) and torch.all(crop_mask[0, 171:] == 0)


def test_smarteraser_crop_and_stitch_round_trip():
    image = torch.rand(1, 300, 400, 3)
    mask = torch.zeros(1, 300, 400)
    mask[0, 100:150, 200:260] = 1
    crop, crop_mask, info = se.smarteraser_crop(image, mask)
    assert crop.shape == (1, 512, 512, 3)
    assert (info.x1 - info.x0, info.y1 - info.y0) == (300, 300)
    assert crop_mask.sum() > 0
    out = stitch(image, torch.zeros_like(crop), info, mask, "mask", 0, se.PASTE_BLUR_RADIUS)  # the demo's paste
    far = torch.ones(300, 400, dtype=torch.bool)
    far[100 - 16:150 + 16, 200 - 16:260 + 16] = False  # beyond 3σ of the radius-5 blur
    assert torch.equal(out[0][far], image[0][far])
    assert out[0, 125, 230].abs().max() < 1e-3  # mask centre: the result


def test_custom_dilation_reaches_the_exact_area():
    mask = torch.zeros(1, 64, 64)
    mask[0, 20:40, 20:40] = 1
    grown = se.dilate_mask(mask, 1.10)
    assert grown.sum().item() == 440 and torch.all(grown[mask > 0] == 1)
    assert se.dilate_mask(mask, 1.0) is mask


def _ellipse(size, axes, angle=0.0, centre=None):
    import cv2

    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, centre or (size // 2, size // 2), axes, angle, 0, 360, 255, -1)
    return mask


# (semi-axes, angle) of ellipse masks on SmartEraser's 512x512 evaluation canvas: small to large objects
ELLIPSES = [((12, 8), 0), ((20, 35), 10), ((40, 25), 30), ((60, 60), 0), ((90, 45), 45), ((120, 80), 20),
            ((150, 100), 70), ((180, 140), 0)]


def test_official_evaluation_dilation_overshoots_to_about_1_2_to_1_3x():
    """MaskAugmentor's test-mode choice 3 asks for 1.10x the area; its loop lands well past it on ellipses."""
    ratios = []
    for axes, angle in ELLIPSES:
        mask = _ellipse(512, axes, angle)
        area = np.count_nonzero(mask > 128)
        ratios.append(np.count_nonzero(se.official_dilate_by_area(mask) > 128) / area)
    assert all(1.10 <= r <= 1.45 for r in ratios), ratios
    assert 1.18 <= float(np.mean(ratios)) <= 1.32, ratios


def test_evaluation_mask_is_binary_and_falls_back_over_70_percent():
    mask = torch.from_numpy(_ellipse(512, (90, 45), 45)).float()[None] / 255
    dilated = se.evaluation_mask(mask)
    assert set(dilated.unique().tolist()) == {0.0, 1.0} and torch.all(dilated[mask > 0.5] == 1)
    huge = torch.zeros(1, 100, 100)
    huge[0, 5:95, 5:90] = 1  # 76.5 % of the image; dilating it passes 70 %
    assert torch.equal(se.evaluation_mask(huge), huge)


def test_evaluation_crop_is_the_whole_image_at_512():
    image = torch.rand(1, 333, 517, 3)
    mask = torch.zeros(1, 333, 517)
    mask[0, 100:200, 50:90] = 1
    crop, crop_mask, info = se.smarteraser_crop(image, mask, "evaluation")
    assert crop.shape == (1, 512, 512, 3) and (info.x0, info.y0, info.x1, info.y1) == (0, 0, 517, 333)
    out = stitch(image, crop, info, mask, "whole crop")
    assert out.shape == image.shape and (out - image).abs().mean() < 0.2


def test_demo_paste_back_blurs_at_the_512_short_side_scale():
    """app_remove.py restore_image: the mask is resized to the 512-short-side image, blurred with radius 5 there,
    and the composite is resized back; on a 1024x2048 photo the feather reaches twice as far as at photo scale."""
    from PIL import ImageFilter

    height, width = 1024, 2048
    mask = torch.zeros(1, height, width)
    mask[0, 400:600, 900:1200] = 1
    _, _, info = se.smarteraser_crop(torch.rand(1, height, width, 3), mask)
    assert info.feather_scale == pytest.approx(0.5)
    from erasekit.erasers.crop_stitch import feather_mask

    ours = feather_mask(mask, 0, se.PASTE_BLUR_RADIUS, info.feather_scale)[0]
    small = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).resize((width // 2, height // 2))
    demo = small.filter(ImageFilter.GaussianBlur(radius=se.PASTE_BLUR_RADIUS)).resize((width, height), Image.BILINEAR)
    demo = torch.from_numpy(np.asarray(demo, dtype=np.float32) / 255)
    assert (ours - demo).abs().max() < 0.06
    row = ours[500, 1200:]
    at_photo_scale = feather_mask(mask, 0, se.PASTE_BLUR_RADIUS)[0, 500, 1200:]
    assert int((row > 0).sum()) >= 2 * int((at_photo_scale > 0).sum())


# ------------------------------------------------------------------------------------------- converter
def test_unet_key_mapping_covers_every_key_once(tmp_path):
    tiny = tiny_module()
    unet = tiny.tiny_unet()
    mapping = conv.unet_diffusers_to_ldm_keys(unet.state_dict())
    assert len(set(mapping.values())) == len(mapping) == len(unet.state_dict())
    assert mapping["conv_in.weight"] == "input_blocks.0.0.weight"
    assert mapping["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.2.0.op.weight"
    assert mapping["down_blocks.1.attentions.0.proj_in.weight"] == "input_blocks.3.1.proj_in.weight"
    assert mapping["mid_block.resnets.1.conv2.weight"] == "middle_block.2.out_layers.3.weight"
    assert mapping["up_blocks.0.attentions.1.norm.weight"] == "output_blocks.1.1.norm.weight"
    assert mapping["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.1.2.conv.weight"
    assert mapping["up_blocks.1.resnets.0.conv_shortcut.weight"] == "output_blocks.2.0.skip_connection.weight"


def test_convert_writes_checkpoint_and_projector(tmp_path):
    tiny = tiny_module()
    folder = tmp_path / "SmartEraser"
    tiny.build_diffusers_folder(folder, full_size_clip=False, projector_format="pth")
    assert conv.main([str(folder), str(tmp_path / "out"), "--name", "se"]) == 0
    checkpoint = load_file(tmp_path / "out" / "se.safetensors")
    assert checkpoint["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    assert any(k.startswith("first_stage_model.decoder.") for k in checkpoint)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in checkpoint
    projector = load_file(tmp_path / "out" / "se_projector.safetensors")
    assert set(projector) == set(se.PROJECTOR_KEYS)


def test_convert_rejects_plain_four_channel_unet(tmp_path, capsys):
    tiny = tiny_module()
    folder = tmp_path / "SD15"
    tiny.build_diffusers_folder(folder, full_size_clip=False, in_channels=4)
    assert conv.main([str(folder), str(tmp_path / "out")]) == 2
    assert "4-channel UNet; SmartEraser needs the 9-channel" in capsys.readouterr().err


def test_convert_names_missing_parts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no unet weights"):
        conv.convert(str(tmp_path / "empty"), str(tmp_path / "out"))
