"""Video4Removal pairs whose only difference is the masked object (issue 19): changes outside the mask are measured as
connected regions and either masked (moving objects of the source frame) or the pair is refused; the lighting test
looks only at pixels where neither frame has foreground.

Held-out clip: tests/data/video03.avi (bgslibrary, MIT; tests/data/SOURCES.md), a static camera over a road where
distant cars are almost always somewhere in the picture."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from erasekit.dataset_tools import video_mining as V

HELD_OUT = Path(__file__).parent / "data" / "video03.avi"
LIMIT = 40  # px: the measure of a changed region outside the mask


def outside_regions(source, target, mask, threshold=25.0):
    """Areas (px, largest first) of the regions where source and target differ outside the mask, measured here
    without the miner's code: |difference| > threshold after a 3×3 blur (largest channel), specks of one or two
    pixels opened away, the mask grown by ~1 % of the frame's side, and pixels where the source is darker than the
    target in every channel left out (the object's own shadow: the eraser is meant to remove it)."""
    blur = [cv2.GaussianBlur(image, (3, 3), 0).astype(np.int16) for image in (source, target)]
    changed = (np.abs(blur[0] - blur[1]).max(axis=2) > threshold).astype(np.uint8)
    changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    margin = max(2, round(0.008 * max(mask.shape))) + 1
    grown = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1,) * 2)) > 0
    darker = (blur[0] < blur[1]).all(axis=2)
    count, _, stats, _ = cv2.connectedComponentsWithStats((changed & ~grown & ~darker).astype(np.uint8), connectivity=8)
    return sorted(stats[1:count, cv2.CC_STAT_AREA].tolist(), reverse=True)


@pytest.fixture(scope="module")
def held_out():
    assert HELD_OUT.is_file(), f"{HELD_OUT} is part of the repository"
    return HELD_OUT


def test_other_cars_are_not_taken_for_lighting_on_the_held_out_clip(held_out):
    """On video03 every frame without a near car still shows a distant car entering the road, which the frames with
    a near car lack: no full-frame pair of it is clean. The lighting test must not take those cars for light (it
    refused every pair at the default lighting_mse), and the pairs must be refused for what they are."""
    pairs, report = V.run_mining(held_out, V.PairingConfig(foreground_ratio=0.02))
    assert report.status == "ok"
    assert report.counts["rejected_outside_changes"] >= 5, report.counts
    assert report.counts["rejected_lighting_differs"] < report.counts["foreground"] / 4, report.counts
    assert V.REASON_WORDS["outside_changes"] in report.reason or pairs


@pytest.mark.parametrize("mode", ["mask", "reject"])
@pytest.mark.parametrize("clip, ratio, lighting", [("held_out", 0.02, 60.0), ("road_video", 0.02, 20.0)])
def test_every_pair_differs_only_inside_its_mask(request, mode, clip, ratio, lighting):
    """On the held-out clip at a lenient lighting limit every pair the old miner made differed outside its mask
    (distant cars); now none does. On road_cars the pairs stay."""
    video = request.getfixturevalue(clip)
    config = V.PairingConfig(foreground_ratio=ratio, lighting_mse=lighting, outside_changes=mode)
    pairs, report = V.run_mining(video, config)
    for pair in pairs:
        regions = outside_regions(pair.source, pair.target, pair.mask)
        assert not regions or regions[0] < LIMIT, (pair.frame, regions[:3])
        assert 0 <= pair.stats["outside_change_px"] < LIMIT
    if clip == "held_out":
        assert report.counts["rejected_outside_changes"] >= 5, report.counts
    else:
        assert len(pairs) >= 10, report.counts


def scene(index, width=640, height=480, car=(30, 50), source_only=(25, 60), specks=1, target_only=None,
          target_at=(20, 20)):
    """A textured static scene (full size 640×480, analysed at 160×120): a large block crosses it during ``car``;
    ``specks`` small blocks (8×8 px, below MOG's speck size at the analysis scale) drift along the bottom during
    ``source_only``; ``target_only`` puts a 12×12 block at ``target_at`` (y, x) while the scene is otherwise
    empty."""
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (9, 9), 0)
    block = np.kron(rng.integers(0, 2, (8, 8, 1)) * 200 + 30, np.ones((20, 20, 3))).astype(np.uint8)  # 160×160
    if car[0] <= index < car[1]:
        x = 120 + (index - car[0]) * 12
        frame[160:320, x:x + 160] = block
    if source_only and source_only[0] <= index < source_only[1]:
        for speck in range(specks):
            x = 560 - 80 * speck + (index - source_only[0])
            frame[400:408, x:x + 8] = (255, 0, 255)
    if target_only and target_only[0] <= index < target_only[1]:
        y, x = target_at
        frame[y:y + 12, x:x + 12] = (0, 255, 255)
    return frame


def mine_scene(mode, lighting_mse=20.0, **scene_args):
    """Pairs and counts of the miner over 120 frames of ``scene`` (10 fps)."""
    config = V.PairingConfig(foreground_ratio=0.05, window_seconds=6, sample_gap_seconds=0.5, analysis_fps=10,
                             outside_changes=mode, lighting_mse=lighting_mse)
    miner = V.PairMiner(10, 640, 480, config)
    pairs = []
    for index in range(120):
        pairs += miner.push(index, scene(index, **scene_args))
    return pairs + miner.finish(), miner.counts


def test_small_objects_moving_only_in_the_source_are_masked_or_the_pair_refused():
    """Six specks, each too small for MOG's cleaned foreground, move while the large block passes: the old miner
    kept pairs where they differ outside the mask; now they are masked, or the pair is refused."""
    masked, counts = mine_scene("mask", specks=6)
    assert masked and any(pair.stats["mask_grown_px"] > 0 for pair in masked), counts
    for pair in masked:
        regions = outside_regions(pair.source, pair.target, pair.mask)
        assert not regions or regions[0] < LIMIT, (pair.frame, regions[:3])
        if pair.stats["mask_grown_px"]:
            specks = np.zeros(pair.mask.shape, bool)
            specks[400:408, 150:620] = True
            changed = specks & (np.abs(pair.source.astype(int) - pair.target.astype(int)).max(axis=2) > 25)
            assert pair.mask[changed].mean() > 0.9  # grown over the specks, not elsewhere
    kept, counts = mine_scene("reject", specks=6)
    assert counts["rejected_outside_changes"] >= 1, counts
    assert len(kept) < len(masked)
    for pair in kept:
        regions = outside_regions(pair.source, pair.target, pair.mask)
        assert not regions or regions[0] < LIMIT, (pair.frame, regions[:3])


@pytest.mark.parametrize("where", [(20, 20), (230, 330)], ids=["away from the object", "where the object passes"])
def test_an_object_only_in_the_target_frame_cannot_be_masked_away(where):
    """The background frame shows a block the source frame lacks, away from the large block (a change outside the
    mask) or on its path (under the mask, too small a share of the zone for the choice of frames to notice):
    either way the target would teach the eraser to paint the block in."""
    for mode in ("mask", "reject"):
        # every empty frame after the large block shows the small one; those before it are clean, further away
        pairs, counts = mine_scene(mode, lighting_mse=200.0, source_only=None, target_only=(50, 120),
                                   target_at=where)
        assert pairs, counts  # the clean frames before are chosen instead
        for pair in pairs:
            assert pair.background_frame < 30, (pair.frame, pair.background_frame)
            assert not outside_regions(pair.source, pair.target, pair.mask)


def test_the_setting_is_checked():
    with pytest.raises(ValueError, match="outside_changes"):
        V.PairingConfig(outside_changes="blur")
