"""The fast mask clean-ups (plain labelling, flood fill) that the video miner runs on every analysed frame give
exactly what connected components with statistics give; the shadow rule and frame streaming."""
import cv2
import numpy as np
import pytest

from erasekit.dataset_tools import video_decode as D
from erasekit.dataset_tools import video_mining as V
from erasekit.erasers import masks as mask_ops


def blobby_masks(count=40, seed=0):
    """Masks with specks, large islands, holes and regions touching the border, in several sizes."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = [(90, 160), (37, 51), (120, 97), (1, 30), (64, 64)][index % 5]
        noise = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 1 + index % 4)
        yield noise > np.quantile(noise, rng.uniform(0.3, 0.9))


def reference_islands(mask, min_pixels):
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False
    return keep[labels]


def reference_holes(mask, max_hole_pixels=None):
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    is_hole = np.ones(count, bool)
    is_hole[0] = False
    is_hole[border] = False
    if max_hole_pixels is not None:
        is_hole &= stats[:, cv2.CC_STAT_AREA] <= max_hole_pixels
    return mask | is_hole[labels]


def test_remove_small_islands_matches_connected_component_stats():
    for index, mask in enumerate(blobby_masks()):
        for min_pixels in (0, 1, 5, 40, 10**6):
            expected = reference_islands(mask, min_pixels)
            assert np.array_equal(mask_ops.remove_small_islands(mask, min_pixels), expected), (index, min_pixels)
            assert np.array_equal(mask_ops.remove_small_islands(mask.view(np.uint8), min_pixels), expected)
    assert not mask_ops.remove_small_islands(np.zeros((5, 7), bool), 1).any()


def test_fill_holes_matches_connected_component_stats():
    for index, mask in enumerate(blobby_masks(seed=1)):
        for max_hole in (None, 0, 3, 50):
            assert np.array_equal(mask_ops.fill_holes(mask, max_hole), reference_holes(mask, max_hole)), (index, max_hole)
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a hole
    ring[0, 3] = True  # a speck on the border: the background around it still reaches the border
    assert mask_ops.fill_holes(ring)[4, 4] and not mask_ops.fill_holes(ring)[0, 4]


@pytest.mark.parametrize("shape", [(3, 5), (180, 301), (41, 9000)])
def test_shadow_pixels_in_bands_matches_whole_image_rule(shape):
    rng = np.random.default_rng(shape[1])
    target = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    # a share of true shadows (darker by 8-50 %, same colour) among random pixels
    source = np.where(rng.random((*shape, 1)) < 0.3, (target * rng.uniform(0.5, 0.92, (*shape, 1))).astype(np.uint8),
                      rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    banded = V.shadow_pixels(source, target)
    assert banded.shape == shape and banded.dtype == bool
    assert np.array_equal(banded, V._shadow_rule(source, target, *V.SHADOW_RULE))
    assert np.array_equal(V.shadow_pixels(source, target, V.DARKER_RULE), V._shadow_rule(source, target, *V.DARKER_RULE))
    assert banded.any() and not banded.all()


def test_iter_frames_reports_where_decoding_stopped(road_video):
    path = road_video
    for prefetch in (0, 4):
        decoded = []
        analysed = [i for i, _ in D.iter_frames(path, 0, 50, 3, prefetch=prefetch, decoded=decoded)]
        assert analysed == list(range(0, 50, 3)) and decoded == [49]
        decoded = []
        count = sum(1 for _ in D.iter_frames(path, 10, None, 7, prefetch=prefetch, decoded=decoded))
        total = int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT))
        assert count == len(range(10, total, 7)) and decoded == [total - 1]
