"""SmartEraser mask irregularisation and clean-ups on the real masks in ../shared/data."""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.erasers import masks as M
from erasekit.erasers.layout import binarize, mask_box

# Collected by name here; read through the `shared_data` fixture (tests/conftest.py), which skips if absent.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_IMAGES = Path(os.environ.get("ERASEKIT_SHARED_DATA", SHARED_DATA)) / "images"
MASK_NAMES = [str(p.relative_to(SHARED_IMAGES)) for p in
              sorted(SHARED_IMAGES.glob("masked/*_mask.png")) + sorted(SHARED_IMAGES.glob("syn_triplets/mask/*.jpg"))]


def load_mask(path):
    return binarize(np.asarray(Image.open(path).convert("L")))


@pytest.fixture(params=MASK_NAMES or ["(no real masks)"], ids=[Path(n).name for n in MASK_NAMES] or ["absent"])
def real_mask(request, shared_data):
    path = shared_data / "images" / request.param
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return load_mask(path)


def area(mask):
    return int(np.count_nonzero(mask))


def within_2_percent(got, wanted):
    return abs(got / wanted - 1) <= 0.02


# --- area-targeted grow/shrink ---

@pytest.mark.parametrize("metric", M.METRICS)
@pytest.mark.parametrize("ratio", [0.3, 0.85, 1.10, 1.35, 2.25, 4.0])
def test_resize_to_area_hits_the_exact_pixel_count(real_mask, ratio, metric):
    out = M.resize_to_area(real_mask, ratio, metric)
    assert area(out) == round(area(real_mask) * ratio)
    if ratio > 1:
        assert (out >= real_mask).all(), "growing must keep every mask pixel"
    else:
        assert (out <= real_mask).all(), "shrinking must not add pixels"


@pytest.mark.parametrize("radius", [1, 4, 15])
def test_chessboard_resize_is_the_official_square_kernel_dilation(real_mask, radius):
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    dilated = cv2.dilate(real_mask.astype(np.uint8), kernel).astype(bool)
    out = M.resize_to_area(real_mask, area(dilated) / area(real_mask), "chessboard")
    assert np.array_equal(out, dilated)
    eroded = cv2.erode(real_mask.astype(np.uint8), kernel).astype(bool)
    out = M.resize_to_area(real_mask, area(eroded) / area(real_mask), "chessboard")
    assert np.array_equal(out, eroded)


def test_euclidean_growth_adds_the_nearest_pixels_first(real_mask):
    out = M.resize_to_area(real_mask, 1.5, "euclidean")
    distance = cv2.distanceTransform((~real_mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    added, left_out = distance[out & ~real_mask], distance[~out]
    assert added.max() <= left_out.min() + 1e-3


def random_blobs(rng, size=96):
    """A few random ellipses and rectangles, some touching the border: awkward real-world-like masks."""
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(2, size // 3, 2))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    if rng.random() < 0.5:
        x, y = (int(v) for v in rng.integers(0, size - 10, 2))
        canvas[y:y + 10, x:] = 1
    return canvas.astype(bool)


@pytest.mark.parametrize("seed", range(40))
def test_chessboard_resize_is_a_partial_ring_of_square_dilation_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    mask = random_blobs(rng)
    ratio = float(rng.choice([rng.uniform(0.05, 0.95), rng.uniform(1.05, 6.0)]))
    out = M.resize_to_area(mask, ratio)
    assert area(out) == min(round(area(mask) * ratio), mask.size)
    # between two successive square dilations (erosions): the exact chessboard geometry
    step = np.ones((3, 3), np.uint8)
    grow = ratio > 1
    inner = mask.astype(np.uint8)
    while True:
        nxt = cv2.dilate(inner, step) if grow else cv2.erode(inner, step)
        if (area(nxt) >= area(out)) if grow else (area(nxt) <= area(out)):
            break
        inner = nxt
    low, high = (inner.astype(bool), nxt.astype(bool)) if grow else (nxt.astype(bool), inner.astype(bool))
    assert (out >= low).all() and (out <= high).all()


def test_growth_saturates_at_the_full_image_and_a_full_mask_erodes_from_the_border():
    small = np.zeros((40, 50), bool)
    small[10:20, 10:20] = True
    assert M.resize_to_area(small, 100.0).all()
    for metric in M.METRICS:
        almost = M.resize_to_area(small, 1999 / 100, metric)
        assert area(almost) == 1999 and (almost >= small).all()
    full = np.ones((40, 50), bool)
    half = M.resize_to_area(full, 0.5)
    assert area(half) == 1000
    assert not half[0].any() and half[20, 25], "a full mask shrinks inwards from the image border"


# --- the six choices ---

@pytest.mark.parametrize("choice", [2, 3])
def test_fixed_erode_and_dilate_land_within_2_percent(real_mask, choice):
    out, used = M.irregularize(real_mask, choice, test_mode=True)
    assert used == choice
    assert within_2_percent(area(out) / area(real_mask), M.TEST_RATIOS[choice])


def test_fixed_hull_dilates_the_hull_within_2_percent_and_contains_the_mask(real_mask):
    out, used = M.irregularize(real_mask, 4, test_mode=True)
    hull = M.convex_hull(real_mask)
    assert used == 4 and (hull >= real_mask).all()
    assert within_2_percent(area(out) / area(hull), M.TEST_RATIOS[4])
    assert (out >= real_mask).all()


def test_fixed_ellipse_contains_the_mask_and_fits_the_dilated_mask(real_mask):
    dilated = M.resize_to_area(real_mask, M.TEST_RATIOS[5])
    assert within_2_percent(area(dilated) / area(real_mask), M.TEST_RATIOS[5])
    out, used = M.irregularize(real_mask, 5, test_mode=True)
    assert used == 5 and (out >= real_mask).all()
    # the least-squares ellipse of all dilated pixels shares their centre and lies mostly inside them
    ellipse = M.ellipse_fit(dilated)
    ellipse_centre = np.argwhere(ellipse).mean(axis=0)
    dilated_centre = np.argwhere(dilated).mean(axis=0)
    assert np.abs(ellipse_centre - dilated_centre).max() < 0.05 * max(real_mask.shape)
    assert area(ellipse & dilated) >= 0.8 * area(ellipse)
    assert np.array_equal(out & ~real_mask, ellipse & ~real_mask)


def test_fixed_blob_contains_the_mask_and_stays_in_the_official_bounds(real_mask):
    box = M._bbox_mask(real_mask)
    grown_box = M.resize_to_area(box, M.TEST_RATIOS[6])
    assert within_2_percent(area(grown_box) / area(box), M.TEST_RATIOS[6])
    x0, y0, x1, y1 = mask_box(grown_box)
    for seed in range(5):
        out, used = M.irregularize(real_mask, 6, np.random.default_rng(seed), test_mode=True)
        assert used == 6 and (out >= real_mask).all()
        bx0, by0, bx1, by1 = mask_box(out)
        slack_x, slack_y = 0.2 * (x1 - x0) + M.BLOB_JITTER + 1, 0.2 * (y1 - y0) + M.BLOB_JITTER + 1
        assert bx0 >= x0 - slack_x and bx1 <= x1 + slack_x and by0 >= y0 - slack_y and by1 <= y1 + slack_y


def test_keep_returns_the_mask(real_mask):
    out, used = M.irregularize(real_mask, 1)
    assert used == 1 and np.array_equal(out, real_mask)


def test_eval_mask_is_the_110_percent_dilation(real_mask):
    assert area(M.smarteraser_eval_mask(real_mask)) == round(area(real_mask) * 1.10)


def test_random_mode_is_reproducible_and_respects_the_shape_rule(real_mask):
    allowed = M.allowed_choices(real_mask)
    first = [M.irregularize(real_mask, "random", np.random.default_rng(seed)) for seed in range(12)]
    again = [M.irregularize(real_mask, "random", np.random.default_rng(seed)) for seed in range(12)]
    for (mask_a, choice_a), (mask_b, choice_b) in zip(first, again):
        assert choice_a == choice_b and np.array_equal(mask_a, mask_b)
        assert choice_a in allowed
    assert len({choice for _, choice in first}) > 1, "twelve seeds should not all draw the same choice"


@pytest.mark.parametrize("choice", [2, 3, 4, 5, 6])
def test_random_ratios_stay_in_the_training_ranges(choice):
    rng = np.random.default_rng(0)
    low, high = M.RANDOM_RATIO_PERCENT[choice]
    ratios = [M.choice_ratio(choice, rng, test_mode=False) for _ in range(200)]
    assert min(ratios) >= 1 + low / 100 - 1e-9 and max(ratios) <= 1 + high / 100 + 1e-9
    assert len(set(ratios)) > 5


def test_shape_rule_on_synthetic_shapes():
    compact = np.zeros((100, 100), bool)
    compact[40:60, 40:60] = True
    assert M.allowed_choices(compact) == [1, 2, 3, 4, 5, 6]
    diagonal = np.eye(100, dtype=bool) | np.roll(np.eye(100, dtype=bool), 1, axis=1)  # sparse in its box
    assert 6 not in M.allowed_choices(diagonal)
    ring = np.zeros((100, 100), bool)
    cv2.circle(ring.view(np.uint8), (50, 50), 30, 1, 3)  # sparse and hollow: mask/hull < 0.6
    assert M.allowed_choices(ring) == [1, 2, 3]
    big = np.zeros((100, 100), bool)
    big[:80, :80] = True
    assert M.allowed_choices(big) == [1]
    assert M.allowed_choices(np.zeros((10, 10), bool)) == [1]
    for seed in range(20):
        assert M.irregularize(ring, "random", np.random.default_rng(seed))[1] in (1, 2, 3)


def test_results_covering_over_70_percent_fall_back_to_the_input():
    mask = np.zeros((100, 100), bool)
    mask[:65] = True  # 65 %: x1.10 is 71.5 %
    out, used = M.irregularize(mask, 3, test_mode=True)
    assert used == 1 and np.array_equal(out, mask)
    mask[60:65] = False  # 60 %: x1.10 is 66 %, kept
    out, used = M.irregularize(mask, 3, test_mode=True)
    assert used == 3 and area(out) == 6600


def test_empty_and_full_masks():
    empty = np.zeros((32, 32), np.uint8)
    for choice in ["random", 2, 3, 4, 5, 6]:
        out, used = M.irregularize(empty, choice)
        assert used == 1 and not out.any()
    full = np.ones((32, 32), bool)
    out, used = M.irregularize(full, "random", np.random.default_rng(0))
    assert used == 1 and out.all()


def test_bad_inputs_raise_clear_errors(real_mask):
    with pytest.raises(ValueError, match="positive"):
        M.resize_to_area(real_mask, 0)
    with pytest.raises(ValueError, match="positive"):
        M.resize_to_area(real_mask, float("nan"))
    with pytest.raises(ValueError, match="metric"):
        M.resize_to_area(real_mask, 1.2, "manhattan")
    with pytest.raises(ValueError, match="choice"):
        M.irregularize(real_mask, 7)
    with pytest.raises(ValueError, match="2-D"):
        M.irregularize(np.stack([real_mask, real_mask]), 3)


# --- clean-ups ---

def test_fill_holes_fills_enclosed_holes_only():
    mask = np.zeros((60, 60), bool)
    mask[10:50, 10:50] = True
    mask[20:25, 20:25] = False  # small hole, 25 px
    mask[30:45, 30:45] = False  # big hole, 225 px
    mask[0:10, 55:60] = True
    mask[0:5, 57] = False  # notch open to the border: not a hole
    filled = M.fill_holes(mask)
    assert filled[10:50, 10:50].all() and not filled[0:5, 57].any()
    limited = M.fill_holes(mask, max_hole_pixels=100)
    assert limited[20:25, 20:25].all() and not limited[30:45, 30:45].any()


def test_remove_small_islands_drops_only_small_components(real_mask):
    speckled = real_mask.copy()
    speckled[0:3, 0:3] = True  # 9 px speck in a corner
    cleaned = M.remove_small_islands(speckled, 20)
    assert not cleaned[0:3, 0:3].any()
    components = cv2.connectedComponentsWithStats(real_mask.astype(np.uint8), connectivity=8)[2]
    big = components[1:, cv2.CC_STAT_AREA] >= 20
    assert area(cleaned) == components[1:, cv2.CC_STAT_AREA][big].sum()


def test_feather_ramps_outwards_and_keeps_the_inside():
    mask = np.zeros((41, 41), bool)
    mask[15:26, 15:26] = True
    soft = M.feather(mask, 4)
    assert soft.dtype == np.float32 and (soft[mask] == 1).all()
    assert 0 < soft[20, 12] < soft[20, 14] < 1 and soft[20, 10] == 0
    assert np.array_equal(M.feather(mask, 0), mask.astype(np.float32))


# --- torch batches ---

def test_batch_items_are_independent_and_seeded_per_item(real_mask):
    batch = torch.from_numpy(np.stack([real_mask] * 3).astype(np.float32))
    batch[1] *= 0.6  # non-binary: still above the 0.5 threshold
    out, used = M.irregularize_batch(batch, "random", seed=7)
    assert out.shape == batch.shape and out.dtype == torch.float32
    for index in range(3):
        expected, choice = M.irregularize(real_mask, "random", M.item_rng(7, index))
        assert used[index] == choice
        assert np.array_equal(out[index].numpy() > 0.5, expected)
    again, used_again = M.irregularize_batch(batch, "random", seed=7)
    assert torch.equal(out, again) and used == used_again


def test_batch_threshold_empty_item_and_progress():
    batch = torch.zeros(2, 32, 32)
    batch[0, 8:24, 8:24] = 0.4  # below threshold: empty
    batch[1, 8:24, 8:24] = 0.7
    calls = []
    out = M.resize_to_area_batch(batch, 1.5, progress=lambda done, total: calls.append((done, total)))
    assert not out[0].any() and int(out[1].sum()) == round(256 * 1.5)
    assert calls == [(1, 2), (2, 2)]
    cleaned = M.clean_mask_batch(batch, fill=True, min_island_pixels=300)
    assert not cleaned.any(), "the 256 px square is an island below 300 px"


# --- erasekit-masks ---

def test_cli_irregularises_a_folder_reproducibly_and_resumes(tmp_path, capsys, shared_data):
    from erasekit.erasers import masks_cli

    folder = shared_data / "images" / "syn_triplets" / "mask"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    out = tmp_path / "out"
    assert masks_cli.main([str(folder), str(out), "--choice", "eval"]) == 0
    for path in sorted(folder.glob("*.jpg")):
        written = load_mask(out / f"{path.stem}.png")
        assert area(written) == round(area(load_mask(path)) * 1.10)
    assert masks_cli.main([str(folder), str(out), "--choice", "eval"]) == 0
    assert "skipped (exists)" in capsys.readouterr().out
    runs = []
    for name in ("a", "b"):
        assert masks_cli.main([str(folder), str(tmp_path / name), "--variants", "2", "--seed", "3"]) == 0
        runs.append(sorted((p.name, np.asarray(Image.open(p)).tobytes()) for p in (tmp_path / name).iterdir()))
    assert runs[0] == runs[1] and len(runs[0]) == 2 * len(list(folder.glob("*.jpg")))


def test_cli_reports_bad_folders_and_unreadable_files(tmp_path, capsys):
    from erasekit.erasers import masks_cli

    assert masks_cli.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    square = np.zeros((64, 64), np.uint8)
    square[16:48, 16:48] = 255
    Image.fromarray(square).save(tmp_path / "in" / "good.png")
    assert masks_cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--ratio", "1.5"]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert area(load_mask(tmp_path / "out" / "good.png")) == round(32 * 32 * 1.5)
