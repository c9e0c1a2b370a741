"""Crop-around-mask / stitch-back: sizes, the three paste-backs on a synthetic shadow, exactness, round trips."""
import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.erasers import crop_stitch
from erasekit.erasers.crop_stitch import (CropInfo, border_alpha, change_map, crop_around_mask, feather_mask,
                                           mask_box, resize_whole_image, stitch, uncrop, whole_image_size)


def _load(path, mode="RGB"):
    return torch.from_numpy(np.asarray(Image.open(path).convert(mode), dtype=np.float32) / 255.0)


def _odd_sized(shared_data):
    """Real photos with real masks, cut to odd sizes (rows/cols removed) so no size is a multiple of 2."""
    dog = _load(shared_data / "images/masked/dog_bench.png")[:-1, 3:]  # 511 x 509
    dog_mask = (_load(shared_data / "images/masked/dog_bench_mask.png", "L")[:-1, 3:] > 0.5).float()
    room = _load(shared_data / "images/masked/room.png")[5:, :-7]  # 251 x 249
    room_mask = (_load(shared_data / "images/masked/room_mask.png", "L")[5:, :-7] > 0.5).float()
    photo = _load(shared_data / "images/removal_pairs/unwant_person.jpg")[:-1, :-1]  # 532 x 799
    photo_mask = torch.zeros(photo.shape[:2])
    photo_mask[201:317, 333:411] = 1.0
    return [(dog, dog_mask), (room, room_mask), (photo, photo_mask)]


@pytest.mark.parametrize("target_side,multiple", [(1024, 16), (512, 8), (200, 16)])
def test_crop_sizes_are_multiples_and_fit_target(shared_data, target_side, multiple):
    for image, mask in _odd_sized(shared_data):
        crop, crop_mask, info = crop_around_mask(image[None], mask[None], context=0.3, target_side=target_side, multiple=multiple)
        side = target_side // multiple * multiple
        assert crop.shape[1] % multiple == 0 and crop.shape[2] % multiple == 0
        assert max(info.resized_height, info.resized_width) == side
        assert crop.shape[1] <= side and crop.shape[2] <= side
        assert crop_mask.shape == crop.shape[:3]
        # The crop covers the whole mask.
        x0, y0, x1, y1 = mask_box(mask[None])
        assert info.x0 <= x0 and info.y0 <= y0 and info.x1 >= x1 and info.y1 >= y1
        # Padding carries no mask.
        assert crop_mask[:, info.resized_height :, :].sum() == 0 and crop_mask[:, :, info.resized_width :].sum() == 0


@pytest.mark.parametrize("grow,blur_radius", [(0, 5.0), (8, 4.0), (0, 0.0)])
def test_stitch_leaves_pixels_outside_feathered_mask_bit_identical(shared_data, grow, blur_radius):
    for image, mask in _odd_sized(shared_data):
        crop, _, info = crop_around_mask(image[None], mask[None], context=0.4, target_side=256)
        erased = torch.rand_like(crop)  # stands in for an eraser's output: very different colours
        out = stitch(image[None], erased, info, mask[None], "mask", grow=grow, blur_radius=blur_radius)
        alpha = feather_mask(mask[None], grow, blur_radius)[0]
        outside = alpha == 0
        assert outside.sum() > 0
        assert torch.equal(out[0][outside], image[outside])
        # Inside the mask proper the eraser's pixels are used.
        assert not torch.equal(out[0][mask > 0.5], image[mask > 0.5])
        assert out.dtype == image.dtype and out.shape == (1,) + tuple(image.shape)


def test_round_trip_without_change_has_no_colour_shift_at_the_seam(shared_data):
    """Stitching the unchanged crop back changes pixels only by the resample error, with no bias at the seam."""
    image, mask = _odd_sized(shared_data)[0]
    crop, _, info = crop_around_mask(image[None], mask[None], context=0.5, target_side=1024)
    out = stitch(image[None], crop, info, mask[None], "mask", grow=4, blur_radius=5.0)
    alpha = feather_mask(mask[None], 4, 5.0)[0]
    seam = (alpha > 0) & (alpha < 1)
    diff = (out[0] - image)[seam]
    assert diff.mean(dim=0).abs().max() < 2e-3  # no colour bias
    assert diff.abs().max() < 0.25  # only resampling differences


def test_crop_of_same_size_and_no_resize_is_exact():
    image = torch.rand(2, 48, 64, 3)
    mask = torch.zeros(1, 48, 64)
    mask[0, 10:20, 30:40] = 1
    crop, crop_mask, info = crop_around_mask(image, mask, context=10.0, target_side=64)
    assert (info.x0, info.y0, info.x1, info.y1) == (0, 0, 64, 48)
    assert torch.equal(crop, image) and torch.equal(crop_mask[0], mask[0])
    for paste_back in crop_stitch.PASTE_BACK:
        assert torch.equal(stitch(image, crop, info, mask, paste_back, blur_radius=2.0), image)


def test_square_crop_and_batch_broadcast():
    image = torch.rand(3, 101, 203, 3)
    mask = torch.zeros(1, 101, 203)
    mask[0, 40:50, 150:170] = 1
    crop, crop_mask, info = crop_around_mask(image, mask, context=0.5, target_side=512, multiple=8, square=True)
    assert info.box_height == info.box_width and crop.shape[1:3] == (512, 512)
    assert crop.shape[0] == 3 and crop_mask.shape[0] == 1
    for paste_back in crop_stitch.PASTE_BACK:
        out = stitch(image, torch.zeros_like(crop), info, mask, paste_back, blur_radius=1.0)
        assert out.shape == image.shape


def test_bad_inputs_raise_clear_errors():
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="empty"):
        crop_around_mask(image, torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="mask is 32x16 .* image is 32x32"):
        crop_around_mask(image, torch.ones(1, 16, 32))
    mask = torch.zeros(1, 32, 32)
    mask[0, 4:8, 4:8] = 1
    crop, _, info = crop_around_mask(image, mask, target_side=64)
    with pytest.raises(ValueError, match="crop's size"):
        stitch(image, crop[:, :16], info, mask)
    wrong = CropInfo(0, 0, 32, 32, 40, 40, 64, 64, 64, 64)
    with pytest.raises(ValueError, match="40x40"):
        stitch(image, crop, wrong, mask)


def test_no_upscale_keeps_small_crops_at_their_size():
    image = torch.rand(1, 99, 141, 3)
    mask = torch.zeros(1, 99, 141)
    mask[0, 30:60, 50:90] = 1
    crop, _, info = crop_around_mask(image, mask, context=0.25, target_side=1024, upscale=False)
    assert (info.resized_height, info.resized_width) == (info.box_height, info.box_width)
    assert crop.shape[1] % 16 == 0 and crop.shape[2] % 16 == 0 and crop.shape[1] < 100
    assert torch.equal(crop[0, : info.box_height, : info.box_width], image[0, info.y0 : info.y1, info.x0 : info.x1])


# ---------------------------------------------------------------------------------------------- paste-backs
GROW, BLUR = 16, 5.0  # the OmniEraser workflow's stitch settings


def _shadow_region(mask, box, near=60, far=150):
    """Pixels 60-150 px from the mask (Euclidean), on the mask's right/lower side, inside the crop box."""
    distance = cv2.distanceTransform((mask.numpy() < 0.5).astype(np.uint8), cv2.DIST_L2, 5)
    ys, xs = np.nonzero(mask.numpy() > 0.5)
    rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
    region = (distance >= near) & (distance <= far) & ((rows >= ys.mean()) | (cols >= xs.mean()))
    inside = np.zeros_like(region)
    x0, y0, x1, y1 = box
    inside[y0:y1, x0:x1] = True
    return torch.from_numpy(region & inside)


def _jpeg(pixels, quality):
    """A JPEG round trip of ``[h,w,3]`` pixels: a stand-in for a VAE round trip (see crop_stitch's calibration)."""
    buffer = io.BytesIO()
    Image.fromarray((pixels.numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0)


def _synthetic_eraser_output(image, mask, info, roundtrip=None):
    """An eraser's output in crop space: the object replaced by grey, a 'shadow' 60-150 px away darkened by 40 %."""
    full = image.clone()
    full[mask > 0.5] = 0.5
    shadow = _shadow_region(mask, (info.x0, info.y0, info.x1, info.y1))
    full[shadow] = full[shadow] * 0.6
    result = crop_stitch.crop_pixels(full[None], info)[0]
    if roundtrip is not None:
        result = roundtrip(result)
    pad = (0, 0, 0, info.padded_width - info.resized_width, 0, info.padded_height - info.resized_height)
    return torch.nn.functional.pad(result, pad)[None], shadow


def _kept_fraction(out, image, result, region):
    """How much of the result's change inside ``region`` the output keeps (1 = all of it)."""
    return float((out[region] - image[region]).abs().sum() / (result[region] - image[region]).abs().sum())


def _well_inside(region, margin):
    """``region`` eroded by ``margin`` px (bool tensor): away from its feathered edge."""
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return torch.from_numpy(cv2.erode(region.numpy().astype(np.uint8), kernel) > 0)


def test_paste_backs_on_a_synthetic_shadow_at_working_scale_one(shared_data):
    """Crop at scale 1 (odd-sized real photos): change-aware and whole-crop keep the shadow, mask-only reverts it,
    and every pixel where the result equals the input is the input bit for bit, in all three."""
    for image, mask in _odd_sized(shared_data):
        crop, _, info = crop_around_mask(image[None], mask[None], min_margin=170, target_side=1024, upscale=False)
        assert (info.resized_height, info.resized_width) == (info.box_height, info.box_width)
        result, shadow = _synthetic_eraser_output(image, mask, info)
        assert shadow.sum() > 500
        patch = torch.zeros_like(image[None])
        patch[:, info.y0 : info.y1, info.x0 : info.x1] = uncrop(result, info)
        unchanged = (patch[0] == image).all(dim=-1)
        unchanged[:info.y0] = unchanged[info.y1:] = True
        unchanged[:, :info.x0] = unchanged[:, info.x1:] = True
        outputs = {p: stitch(image[None], result, info, mask[None], p, GROW, BLUR)[0] for p in crop_stitch.PASTE_BACK}
        for paste_back, out in outputs.items():
            assert torch.equal(out[unchanged], image[unchanged]), paste_back
            assert torch.equal(out[mask > 0.5], patch[0][mask > 0.5]), paste_back  # the object is erased
        smoothed = crop_stitch.gaussian_blur((patch[0] - image).movedim(-1, 0)[None], crop_stitch.CHANGE_SMOOTH_SIGMA)
        visible = _well_inside(shadow & (smoothed[0].abs().amax(dim=0) > 2 * crop_stitch.CHANGE_THRESHOLD), 3)
        assert visible.sum() > 100
        for paste_back in ("whole crop", "change-aware"):
            assert torch.equal(outputs[paste_back][visible], patch[0][visible]), paste_back
            assert _kept_fraction(outputs[paste_back], image, patch[0], shadow) > 0.9, paste_back
        assert torch.equal(outputs["mask"][shadow], image[shadow])  # mask-only reverts it, bit for bit


def test_change_aware_ignores_round_trip_noise_on_resampled_crops(shared_data):
    """A 1024 px working crop (resampled), the result through a JPEG round trip as noisy as a VAE's: change-aware
    still returns every pixel away from the mask and the shadow bit-identical, and keeps the shadow."""
    for image, mask in _odd_sized(shared_data):
        _, _, info = crop_around_mask(image[None], mask[None], min_margin=170, target_side=1024)
        assert info.resized_width != info.box_width
        result, shadow = _synthetic_eraser_output(image, mask, info, roundtrip=lambda x: _jpeg(x, 30))
        out = stitch(image[None], result, info, mask[None], "change-aware", GROW, BLUR)[0]
        reach = int(np.ceil((GROW + 3 * BLUR + 2) * 2))
        near = torch.from_numpy(cv2.dilate(((mask > 0.5) | shadow).numpy().astype(np.uint8),
                                           np.ones((2 * reach + 1,) * 2, np.uint8)) > 0)
        assert torch.equal(out[~near], image[~near])
        patch = torch.zeros_like(image)
        patch[info.y0 : info.y1, info.x0 : info.x1] = uncrop(result, info)[0]
        assert _kept_fraction(out, image, patch, shadow) > 0.9
        whole = stitch(image[None], result, info, mask[None], "whole crop")[0]
        assert not torch.equal(whole[~near], image[~near])  # why change-aware is OmniEraser's default


def test_change_map_counts_no_round_trip_noise_and_keeps_a_real_reflection(shared_data):
    """The calibration of CHANGE_THRESHOLD, re-checked: JPEG q30 on 1024 px photos counts as no change; the floor
    reflection in IOPaint's unwant_person pair is found down to where it fades (row ~700 of 800)."""
    photos = sorted((shared_data / "images/removal_pairs").glob("*.jpg"))
    photos += sorted((shared_data / "images/syn_triplets/gt").glob("*.jpg"))
    for path in photos:
        picture = Image.open(path).convert("RGB")
        scale = 1024 / max(picture.size)
        picture = picture.resize((round(picture.size[0] * scale), round(picture.size[1] * scale)), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
        assert not change_map(pixels[None], _jpeg(pixels, 30)[None]).any(), path.name
    before = _load(shared_data / "images/removal_pairs/unwant_person.jpg")
    after = _load(shared_data / "images/removal_pairs/unwant_person_clean.jpg")
    rows = torch.nonzero(change_map(before[None], after[None])[0].any(dim=1)).flatten()
    assert rows.min() < 70 and rows.max() > 680  # head to the end of the reflection


def test_whole_crop_alpha_feathers_only_at_inner_crop_borders():
    info = CropInfo(0, 40, 100, 140, 200, 100, 100, 100, 100, 100)  # touches the photo's left, right edges
    alpha = border_alpha(info)
    assert alpha.shape == (100, 100)
    assert torch.all(alpha[:, 0] == alpha[:, 50]) and torch.all(alpha[50] == 1)  # no ramp at left/right
    assert 0 < alpha[0, 50] < 0.25 and 0 < alpha[-1, 50] < 0.25 and alpha[4, 50] == 1  # ramp 100/32 px
    whole = CropInfo(0, 0, 100, 200, 200, 100, 64, 32, 64, 32)
    assert torch.all(border_alpha(whole) == 1)


def test_feather_at_smarteraser_scale_reaches_farther_on_large_photos():
    """SmartEraser's demo blurs (radius 5) at the 512-short-side scale: on a 2048 px photo that is 4x farther."""
    mask = torch.zeros(1, 2048, 2048)
    mask[0, 900:1100, 900:1100] = 1
    at_photo = feather_mask(mask, 0, 5.0)[0, 1024]
    at_demo = feather_mask(mask, 0, 5.0, scale=0.25)[0, 1024]
    reach_photo = int((at_photo[1100:] > 0).sum())
    reach_demo = int((at_demo[1100:] > 0).sum())
    assert reach_photo == 15 and 4 * 15 <= reach_demo <= 4 * 17
    assert torch.all(at_demo[1100 + reach_demo:] == 0)


@pytest.mark.parametrize("size", [(533, 800), (800, 800), (429, 800), (1080, 1920), (777, 1021), (3000, 1999)])
def test_whole_image_size_is_the_official_demos(size):
    """gradio_control_lora_flux.py: short side 1024, long ``int(long / short * 1024)``, both floored to 16."""
    height, width = size
    if width < height:
        demo_w, demo_h = 1024, int(height / width * 1024)
    else:
        demo_w, demo_h = int(width / height * 1024), 1024
    expected = (demo_h - demo_h % 16, demo_w - demo_w % 16)
    assert whole_image_size(height, width) == expected
    image = torch.rand(1, height // 4, width // 4, 3)  # the same arithmetic at a quarter size, floored to 16
    mask = torch.zeros(1, height // 4, width // 4)
    mask[0, 10:20, 10:20] = 1
    crop, crop_mask, info = resize_whole_image(image, mask)
    assert crop.shape[1:3] == whole_image_size(height // 4, width // 4) and crop_mask.shape == crop.shape[:3]
    assert crop.shape[1] % 16 == 0 and crop.shape[2] % 16 == 0 and min(crop.shape[1:3]) == 1024
    out = stitch(image, crop, info, mask, "whole crop")
    assert out.shape == image.shape and (out - image).abs().mean() < 0.2
