"""Several objects per photo: splitting a mask into objects, grouping nearby ones, one crop per group, and
stitching the erased crops back one after another (erasers/crop_stitch.py, SmartEraser's split crop)."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.erasers import crop_stitch as cs
from erasekit.erasers import smarteraser as se
from erasekit.erasers.crop_stitch import (CropInfo, box_gap, context_box, crop_around_mask, crop_around_objects,
                                           group_boxes, object_boxes, object_groups, part_runs, stitch,
                                           stitch_parts)


def _three_objects(height=157, width=203):
    """An odd-sized random photo and a mask with three separate objects (a disc, a bar, a blob of two specks
    touching diagonally: one object under 8-connectivity)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, height, width, 3, generator=generator)
    mask = torch.zeros(1, height, width)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    mask[0][(ys - 30) ** 2 + (xs - 35) ** 2 <= 12 ** 2] = 1.0
    mask[0, 110:121, 20:61] = 1.0
    mask[0, 60:70, 160:170] = 1.0
    mask[0, 70:80, 170:180] = 1.0  # touches the square above at one corner
    return image, mask


def _inside_boxes(infos, height, width):
    inside = torch.zeros(height, width, dtype=torch.bool)
    for info in infos:
        inside[info.y0 : info.y1, info.x0 : info.x1] = True
    return inside


def _lantern_mask(shared_data):
    """The four paper lanterns IOPaint removed from unwant_object.jpg (where the photo is brighter than its clean
    version, as the omnieraser_multi_object workflow makes it), cut to an odd size: 533 x 799."""
    folder = shared_data / "images/removal_pairs"
    photo = np.asarray(Image.open(folder / "unwant_object.jpg").convert("RGB"), np.float32)[:, :-1] / 255
    clean = np.asarray(Image.open(folder / "unwant_object_clean.jpg").convert("RGB"), np.float32)[:, :-1] / 255
    from erasekit.erasers.masks import clean_mask

    brighter = np.clip(photo - clean, 0, 1).sum(-1) > 0.2
    mask = torch.from_numpy(np.asarray(clean_mask(brighter, True, None, 400, 0.0), np.float32))
    return torch.from_numpy(photo)[None], mask[None]


# ------------------------------------------------------------------------------------------- objects and groups
def test_object_boxes_are_the_8_connected_pieces_in_reading_order():
    _, mask = _three_objects()
    assert object_boxes(mask) == [(23, 18, 48, 43), (160, 60, 180, 80), (20, 110, 61, 121)]
    assert cs.union_box(object_boxes(mask)) == cs.mask_box(mask)
    batch = torch.zeros(2, 20, 30)
    batch[0, 2:4, 2:4] = 1
    batch[1, 10:12, 20:25] = 0.3  # any value above 0 is mask, as for mask_box; the batch's union counts
    assert object_boxes(batch) == [(2, 2, 4, 4), (20, 10, 25, 12)]
    with pytest.raises(ValueError, match="empty"):
        object_boxes(torch.zeros(1, 8, 8))


def test_box_gap_is_the_chebyshev_gap():
    assert box_gap((0, 0, 10, 10), (10, 0, 20, 10)) == 0  # touching
    assert box_gap((0, 0, 10, 10), (5, 5, 20, 20)) < 0  # overlapping
    assert box_gap((0, 0, 10, 10), (15, 40, 20, 50)) == 30  # apart by 5 across, 30 down
    assert list(box_gap((0, 0, 10, 10), [(12, 0, 20, 5), (0, 11, 5, 20)])) == [2, 1]


@pytest.mark.parametrize("distance", [0, 3, 7])
def test_groups_merge_exactly_when_crop_boxes_lie_within_the_distance(distance):
    same = lambda box: box  # noqa: E731 (no context: the crop box is the object's box)
    for gap in range(0, 10):
        groups = group_boxes([(0, 0, 10, 10), (10 + gap, 4, 20 + gap, 8)], same, distance)
        assert len(groups) == (1 if gap <= distance else 2), (gap, distance)
    # overlapping boxes always merge, into their union
    assert group_boxes([(0, 0, 10, 10), (5, 5, 20, 20)], same, distance) == [((0, 0, 20, 20), (0, 0, 20, 20))]


def test_grouping_repeats_when_a_merged_group_reaches_another():
    """A and B's crop boxes overlap; C is out of reach of either alone but within the context of A+B's box."""
    height, width = 400, 400
    context_of = lambda box: context_box(box, height, width, context=0.5)  # noqa: E731
    a, b, c = (100, 100, 120, 120), (130, 100, 150, 120), (170, 100, 175, 105)
    assert box_gap(context_of(a), context_of(c)) > 0 and box_gap(context_of(b), context_of(c)) > 0
    assert box_gap(context_of(cs.union_box([a, b])), context_of(c)) <= 0
    groups = group_boxes([a, b, c], context_of)
    assert [group for group, _ in groups] == [(100, 100, 175, 120)]


@pytest.mark.parametrize("seed,context,distance", list(itertools.product(range(4), (0.0, 0.3, 1.0), (0, 12))))
def test_group_crop_boxes_never_meet_and_hold_every_object(seed, context, distance):
    generator = np.random.default_rng(seed)
    height, width = 181, 263
    mask = torch.zeros(1, height, width)
    for _ in range(12):
        y, x = generator.integers(0, height - 8), generator.integers(0, width - 8)
        h, w = generator.integers(1, 9, size=2)
        mask[0, y : y + h, x : x + w] = 1
    groups = object_groups(mask, lambda box: context_box(box, height, width, context), distance)
    crops = [crop for _, crop in groups]
    for first, second in itertools.combinations(crops, 2):
        assert box_gap(first, second) > distance
    for group, crop in groups:
        assert crop == context_box(group, height, width, context)
    owners = torch.zeros(height, width, dtype=torch.int64)
    for x0, y0, x1, y1 in crops:
        owners[y0:y1, x0:x1] += 1
    assert torch.all(owners[mask[0] > 0] == 1)  # every object pixel lies in exactly one crop
    assert [g for g, _ in groups] == sorted((g for g, _ in groups), key=lambda g: (g[1], g[0]))  # reading order


# ------------------------------------------------------------------------------------------- crops
def test_three_separate_objects_make_three_crops_on_an_odd_sized_photo():
    image, mask = _three_objects()
    crops = crop_around_objects(image, mask, context=0.25, target_side=96, multiple=16)
    assert len(crops) == 3
    for part, (crop, crop_mask, info) in enumerate(crops):
        assert (info.part, info.parts) == (part, 3)
        assert crop.shape[1] % 16 == 0 and crop.shape[2] % 16 == 0 and max(crop.shape[1:3]) == 96
        assert crop_mask.shape == crop.shape[:3] and crop_mask.sum() > 0
        alone = crop_around_mask(image, mask * _inside_boxes([info], 157, 203), context=0.25, target_side=96)
        assert torch.equal(crop, alone[0]) and torch.equal(crop_mask, alone[1])  # the group's own crop
        assert alone[2] == CropInfo(**{**info.__dict__, "part": 0, "parts": 1})


def test_split_with_one_group_is_the_single_crop():
    image, mask = _three_objects()
    disc_only = mask.clone()
    disc_only[0, 55:] = 0
    for one_group, context in ((disc_only, 0.25), (mask, 3.0)):  # one object; three merged by a wide context
        crops = crop_around_objects(image, one_group, context=context, target_side=128)
        single = crop_around_mask(image, one_group, context=context, target_side=128)
        assert len(crops) == 1
        assert torch.equal(crops[0][0], single[0]) and torch.equal(crops[0][1], single[1])
        assert crops[0][2] == single[2]


def test_lanterns_split_into_groups_of_nearby_objects(shared_data):
    """Real data: IOPaint's four removed lanterns. Tight context: four crops; 0.25: the three lanterns on the
    left share one crop and the fourth gets its own; the default 0.75: one crop over the whole photo."""
    photo, mask = _lantern_mask(shared_data)
    assert len(object_boxes(mask)) == 4
    counts = {context: len(crop_around_objects(photo, mask, context=context, target_side=256))
              for context in (0.1, 0.25, cs.CONTEXT)}
    assert counts == {0.1: 4, 0.25: 2, cs.CONTEXT: 1}


# ------------------------------------------------------------------------------------------- stitching in turn
@pytest.mark.parametrize("paste_back", cs.PASTE_BACK)
def test_stitching_three_crops_leaves_every_pixel_outside_them_bit_identical(paste_back):
    image, mask = _three_objects()
    image = image * 0.5
    crops = crop_around_objects(image, mask, context=0.25, target_side=96)
    results = [torch.ones_like(crop) for crop, _, _ in crops]  # an "eraser" that paints everything white
    infos = [info for _, _, info in crops]
    out = stitch_parts(image, results, infos, mask, paste_back, grow=2, blur_radius=2.0)
    inside = _inside_boxes(infos, 157, 203)
    assert out.shape == image.shape and inside.sum() < 0.5 * inside.numel()
    assert torch.equal(out[0][~inside], image[0][~inside])
    for info in infos:  # each crop was pasted: the object pixels of every crop changed
        box = (slice(info.y0, info.y1), slice(info.x0, info.x1))
        on_object = mask[0][box] > 0
        assert torch.all((out[0][box][on_object] - image[0][box][on_object]).amin(-1) > 0.2)
    # each paste went into the result of the one before: the same as three single stitches in a row, in any order
    for order in ([0, 1, 2], [2, 0, 1]):
        expected = image
        for k in order:
            part_mask = mask * _inside_boxes([infos[k]], 157, 203)
            expected = stitch(expected, results[k], infos[k], part_mask, paste_back, 2, 2.0, reference=image)
        assert torch.equal(out, expected)


def test_each_paste_keeps_its_neighbours_mask_out_of_its_feather():
    """A speck 2 px beyond object A's crop box has its own crop; A's feathered paste must not feel it."""
    image = torch.rand(1, 40, 61, 3)
    mask = torch.zeros(1, 40, 61)
    mask[0, 20:24, 20:24] = 1  # A: crop box (16, 16, 28, 28) with context 1
    mask[0, 22, 30] = 1  # the speck: crop box (29, 21, 32, 24)
    crops = crop_around_objects(image, mask, context=1.0, target_side=32, multiple=8)
    infos = [info for *_, info in crops]
    assert [(i.x0, i.y0, i.x1, i.y1) for i in infos] == [(16, 16, 28, 28), (29, 21, 32, 24)]
    results = [torch.zeros_like(crop) for crop, _, _ in crops]
    out = stitch_parts(image, results, infos, mask, "mask", grow=0, blur_radius=3.0)
    expected = image
    for result, info in zip(results, infos):
        expected = stitch(expected, result, info, mask * _inside_boxes([info], 40, 61), "mask", 0, 3.0)
    assert torch.equal(out, expected)
    with_speck = stitch(image, results[0], infos[0], mask, "mask", 0, 3.0)
    assert not torch.equal(with_speck[0, 16:28, 16:28], out[0, 16:28, 16:28])  # the speck would have reached A


def test_change_map_is_taken_against_the_photo_the_crops_were_cut_from():
    """Two overlapping crops (as a user's own crop infos could be). Crop 1 erases object A and its shadow S, which
    lies outside the mask and inside crop 2 too; crop 2 holds no object and changes nothing, but was cut from the
    photo before crop 1 was pasted, so it still shows S. Compared with the photo it was cut from, crop 2 changed
    nothing and S stays erased; compared with the photo after crop 1, S would look changed and come back."""
    height, width = 64, 96
    image = torch.full((1, height, width, 3), 0.5)
    image[0, 20:40, 10:25] = torch.tensor([0.9, 0.1, 0.1])  # object A
    image[0, 20:40, 40:56] = 0.2  # its shadow S
    mask = torch.zeros(1, height, width)
    mask[0, 20:40, 10:25] = 1
    first = CropInfo(0, 0, 64, 64, height, width, 64, 64, 64, 64, part=0, parts=2)
    second = CropInfo(32, 0, 96, 64, height, width, 64, 64, 64, 64, part=1, parts=2)
    erased = torch.full((1, 64, 64, 3), 0.5)  # crop 1 erases A and S
    untouched = image[:, :, 32:96].clone()  # crop 2 changes nothing
    out = stitch_parts(image, [erased, untouched], [first, second], mask, "change-aware", blur_radius=0.0)
    assert torch.equal(out[0, :, :60], torch.full((height, 60, 3), 0.5))  # A and S erased; crop 1's border ramp
    assert torch.equal(out[0, :, 64:], image[0, :, 64:])                    # (60-64) blends S's photo and result
    as_if_current = stitch(stitch(image, erased, first, mask, "change-aware", blur_radius=0.0), untouched, second,
                           mask, "change-aware", blur_radius=0.0)
    assert torch.allclose(as_if_current[0, 25:35, 44:52], torch.tensor(0.2))  # that rule would bring S back


def test_part_runs_and_stitch_errors():
    info = CropInfo(0, 0, 8, 8, 8, 8, 8, 8, 8, 8)
    parts = [CropInfo(0, 0, 8, 8, 8, 8, 8, 8, 8, 8, part=k, parts=3) for k in range(3)]
    assert part_runs([info, *parts, info]) == [(0, 1), (1, 4), (4, 5)]
    with pytest.raises(ValueError, match="whole runs.*got 1/3, 3/3"):
        part_runs([parts[0], parts[2]])
    with pytest.raises(ValueError, match="2 erased crops for 3 crop infos"):
        stitch_parts(torch.rand(1, 8, 8, 3), [torch.rand(1, 8, 8, 3)] * 2, parts, torch.ones(1, 8, 8))


# ------------------------------------------------------------------------------------------- SmartEraser
def test_smarteraser_split_gives_a_512_square_per_group():
    image, mask = _three_objects(301, 457)
    crops = se.smarteraser_split_crops(image, mask)
    assert len(crops) == 3
    for part, (crop, crop_mask, info) in enumerate(crops):
        assert crop.shape == (1, 512, 512, 3) and crop_mask.shape == (1, 512, 512)
        assert info.box_width == info.box_height < 301 and (info.part, info.parts) == (part, 3)
        assert info.feather_scale == pytest.approx(512 / 301)  # the demo's 512-short-side scale
    results = [torch.zeros_like(crop) for crop, _, _ in crops]
    infos = [info for *_, info in crops]
    out = stitch_parts(image, results, infos, mask, "mask", 0, se.PASTE_BLUR_RADIUS)
    inside = _inside_boxes(infos, 301, 457)
    assert torch.equal(out[0][~inside], image[0][~inside])
    for y, x in ((30, 35), (65, 165), (115, 40)):  # every object's centre pasted (the zero result, feathered)
        assert torch.all(out[0, y, x] <= 0.3 * image[0, y, x])


def test_smarteraser_split_falls_back_to_the_demos_pad_mode_for_long_groups():
    image = torch.rand(1, 100, 300, 3)
    mask = torch.zeros(1, 100, 300)
    mask[0, 10:90, 0:250] = 1  # longer than the short side: the demo pads the whole image
    mask[0, 40:45, 290:295] = 1
    crops = se.smarteraser_split_crops(image, mask)
    assert len(crops) == 1
    crop, _, info = crops[0]
    single = se.smarteraser_crop(image, mask)
    assert torch.equal(crop, single[0]) and info == single[2]


def test_smarteraser_split_context_and_distance_merge_groups():
    image, mask = _three_objects(301, 457)
    assert len(se.smarteraser_split_crops(image, mask, context=3.0)) == 1
    assert len(se.smarteraser_split_crops(image, mask, distance=400)) == 1
