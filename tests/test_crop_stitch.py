"""Crop-around-mask / stitch-back: sizes, exactness outside the feathered mask, and round trips."""
import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.erasers.crop_stitch import CropInfo, crop_around_mask, feather_mask, mask_box, stitch


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
        out = stitch(image[None], erased, info, mask[None], grow=grow, blur_radius=blur_radius)
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
    out = stitch(image[None], crop, info, mask[None], grow=4, blur_radius=5.0)
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
    out = stitch(image, crop, info, mask, blur_radius=2.0)
    assert torch.equal(out, image)


def test_square_crop_and_batch_broadcast():
    image = torch.rand(3, 101, 203, 3)
    mask = torch.zeros(1, 101, 203)
    mask[0, 40:50, 150:170] = 1
    crop, crop_mask, info = crop_around_mask(image, mask, context=0.5, target_side=512, multiple=8, square=True)
    assert info.box_height == info.box_width and crop.shape[1:3] == (512, 512)
    assert crop.shape[0] == 3 and crop_mask.shape[0] == 1
    out = stitch(image, torch.zeros_like(crop), info, mask, blur_radius=1.0)
    assert out.shape == image.shape


def test_bad_inputs_raise_clear_errors():
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="empty"):
        crop_around_mask(image, torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="same size"):
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
