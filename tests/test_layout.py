"""erasers/layout.py: the one mask threshold, IMAGE/MASK checks and broadcasting, boxes, resizing, crop-pad."""
import numpy as np
import pytest
import torch

from erasekit.erasers import layout as L


def blobs(count=12, seed=0):
    """Masks with islands and strided views, in several sizes."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = [(90, 160), (37, 51), (120, 97), (1, 30), (64, 64)][index % 5]
        yield rng.random((height, width)) > rng.uniform(0.6, 0.99)


# --- the threshold -------------------------------------------------------------------------------------------

def test_a_uint8_zero_one_mask_is_the_object_not_empty():
    """The bug train/datasets.py's _as_mask had: thresholding integers at 127.5 emptied a {0, 1} mask."""
    mask = np.zeros((32, 48), np.uint8)
    mask[8:20, 10:30] = 1
    binary = L.binarize(mask)
    assert binary.dtype == bool and binary.sum() == 12 * 20 and np.array_equal(binary, mask == 1)
    assert np.array_equal(L.binarize(mask * 255), binary)  # the same mask as a {0, 255} image
    assert torch.equal(L.binarize(torch.from_numpy(mask)), torch.from_numpy(binary))
    assert np.array_equal(L.binarize(mask.astype(np.int64)), binary)


def test_eight_bit_masks_cut_where_their_float_mask_does():
    values = np.arange(256, dtype=np.uint8)[None]
    as_float = values.astype(np.float32) / 255.0
    assert np.array_equal(L.binarize(values), L.binarize(as_float))
    assert L.binarize(values)[0].tolist() == [False] * 128 + [True] * 128
    assert L.binarize(np.array([[0.4999, 0.5]])).tolist() == [[False, True]]
    assert torch.equal(L.binarize(torch.tensor([[0.49, 0.5, 1.0]])), torch.tensor([[False, True, True]]))
    assert L.binarize(np.array([[0, 40000]], np.uint16)).tolist() == [[False, True]]  # 16-bit: full scale 65535
    assert not L.binarize(np.zeros((3, 3), np.uint8)).any()


def test_binarize_copies_checks_dimensions_and_rejects_other_dtypes():
    mask = np.ones((4, 4), bool)
    out = L.binarize(mask)
    out[0, 0] = False
    assert mask.all()  # a new array
    with pytest.raises(ValueError, match="2-D"):
        L.binarize(np.ones((2, 4, 4), bool), ndim=2)
    with pytest.raises(ValueError, match="dtype"):
        L.binarize(np.array([["a"]]))


# --- IMAGE / MASK ----------------------------------------------------------------------------------------------

def test_check_mask_matches_image_names_both_sizes_and_broadcasts():
    image = torch.zeros(3, 48, 64, 3)
    with pytest.raises(ValueError, match=r"mask is 32x48 .* image is 64x48"):
        L.check_mask_matches_image(image, torch.zeros(1, 48, 32))
    with pytest.raises(ValueError, match="batch of 2 .* batch of 3"):
        L.check_mask_matches_image(image, torch.zeros(2, 48, 64))
    assert L.check_mask_matches_image(image, torch.zeros(1, 48, 64)).shape == (3, 48, 64)
    assert L.check_mask_matches_image(image, torch.zeros(48, 64)).shape == (3, 48, 64)
    assert L.check_mask_matches_image(image[:1], torch.zeros(4, 48, 64)).shape == (4, 48, 64)


def test_check_image_and_match_batches():
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\], got shape \(48, 64, 3\)"):
        L.check_image(torch.zeros(48, 64, 3))
    assert L.check_image(torch.zeros(1, 8, 8, 4), channels=(3, 4)).shape[-1] == 4
    image, mask = L.match_batches(torch.zeros(1, 8, 8, 3), torch.zeros(5, 8, 8))
    assert image.shape == (5, 8, 8, 3) and mask.shape == (5, 8, 8)
    with pytest.raises(ValueError, match="batches of 2 and 3"):
        L.match_batches(torch.zeros(2, 8, 8, 3), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"\[batch, height, width\]"):
        L.as_mask_batch(torch.zeros(1, 1, 8, 8))


# --- boxes -----------------------------------------------------------------------------------------------------

def test_mask_box_is_the_pixel_extent_for_numpy_and_torch():
    for mask in blobs():
        if not mask.any():
            assert L.mask_box(mask) is None
            continue
        ys, xs = np.nonzero(mask)
        height, width = mask.shape
        for pad in (0, 2):
            expected = (max(0, int(xs.min()) - pad), max(0, int(ys.min()) - pad),
                        min(width, int(xs.max()) + pad + 1), min(height, int(ys.max()) + pad + 1))
            assert L.mask_box(mask, pad) == expected
            assert L.mask_box(torch.from_numpy(mask), pad) == expected
            assert L.mask_box(mask.astype(np.float32) * 0.2, pad) == expected  # every painted pixel
        assert L.mask_box(mask[::2, 1::3]) is None or len(L.mask_box(mask[::2, 1::3])) == 4  # strided views
    assert L.mask_box(np.zeros((4, 4), bool)) is None and L.mask_box(torch.zeros(2, 4, 4)) is None


def test_mask_box_of_a_batch_is_the_union():
    batch = np.zeros((2, 20, 30), bool)
    batch[0, 2:5, 3:6] = True
    batch[1, 10:12, 20:25] = True
    assert L.mask_box(batch) == (3, 2, 25, 12) == L.mask_box(torch.from_numpy(batch))


# --- resizing, the replacements of the erasers' own copies ----------------------------------------------------

@pytest.fixture
def soft_mask():
    mask = torch.zeros(2, 70, 90)
    mask[0, 10:40, 20:50] = 1.0
    mask[1, 30:60, 40:85] = torch.linspace(0.2, 0.9, 45)  # soft values on both sides of 0.5
    return mask


def test_latent_mask_nearest_and_any_cover(soft_mask):
    from erasekit.erasers import attention

    binary = (soft_mask >= 0.5).float()
    for height, width in ((9, 12), (35, 45), (70, 90)):
        nearest = L.latent_mask(soft_mask, height, width)
        assert nearest.shape == (2, 1, height, width)
        assert torch.equal(nearest, torch.nn.functional.interpolate(binary[:, None], size=(height, width)))
        assert torch.equal(L.latent_mask(binary, height, width, cover="any")[:, 0] > 0,
                           attention.latent_mask(binary, height, width))
    with pytest.raises(ValueError, match="cover"):
        L.latent_mask(binary, 4, 4, cover="mean")


def test_crop_resize_pad_makes_the_crops_of_crop_stitch_and_smarteraser(soft_mask):
    from erasekit.erasers import crop_stitch, smarteraser

    image = torch.rand(2, 70, 90, 3)
    for upscale in (True, False):
        crop, crop_mask, info = crop_stitch.crop_around_mask(image, soft_mask, target_side=64, multiple=16,
                                                             upscale=upscale)
        mine = L.crop_resize_pad(image, soft_mask, (info.x0, info.y0, info.x1, info.y1),
                                 (info.resized_height, info.resized_width), (info.padded_height, info.padded_width))
        assert torch.equal(mine[0], crop) and torch.equal(mine[1], crop_mask)
    crop, crop_mask, info = smarteraser.smarteraser_crop(image, soft_mask, size=48)
    mine = L.crop_resize_pad(image, soft_mask, (info.x0, info.y0, info.x1, info.y1),
                             (info.resized_height, info.resized_width), (48, 48), image_pad=1.0)
    assert torch.equal(mine[0], crop) and torch.equal(mine[1], crop_mask)


def test_resize_mask_keeps_what_covers_half_a_pixel_and_images_average_when_shrinking():
    import cv2

    mask = next(blobs(seed=4))[:40, :56]
    halved = L.resize_mask(mask, 28, 20)
    coverage = mask.reshape(20, 2, 28, 2).mean(axis=(1, 3))
    assert halved.dtype == bool and np.array_equal(halved, coverage >= 0.5)
    assert np.array_equal(L.resize_mask(mask.astype(np.uint8), 28, 20), halved)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    assert np.array_equal(L.resize_image(rgb, 28, 20), cv2.resize(rgb, (28, 20), interpolation=cv2.INTER_AREA))
    assert np.array_equal(L.resize_image(rgb, 80, 60), cv2.resize(rgb, (80, 60), interpolation=cv2.INTER_LINEAR))
