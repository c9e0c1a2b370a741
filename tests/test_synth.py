"""Syn4Removal: instance sources, filters, CLIP scoring, placement rules and pasting on real photos."""
import json
import re

import cv2
import numpy as np
import pytest
import torch

from erasekit.jobs import Skips
from erasekit.dataset_tools import imageio
from erasekit.dataset_tools import instances as inst
from erasekit.dataset_tools import synth
from erasekit.dataset_tools.clip_score import CLIP_MEAN, CLIP_STD, ClipScorer, preprocess, white_background
from erasekit.dataset_tools.triplets import TripletDataset


# ---- helpers -------------------------------------------------------------------------------------------
def build_tiny_clip(folder):
    """A random 1-layer transformers CLIP with a character-level tokenizer, saved like a hub folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def real_instances(shared_data):
    skips = Skips()
    found = inst.folder_instances(shared_data / "images" / "masked", skips=skips)
    found += inst.folder_instances(shared_data / "images" / "syn_triplets", skips=skips)
    return found, skips


# ---- image reading -------------------------------------------------------------------------------------
def test_imageio_handles_odd_formats(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image")

    gray, _ = imageio.read_rgb(tmp_path / "gray.png")
    assert gray.shape == (20, 30, 3) and np.array_equal(gray[..., 2], rgb[..., 0])
    rgba, _ = imageio.read_rgb(tmp_path / "rgba.png")
    assert np.array_equal(rgba, rgb)
    deep = Image.open(tmp_path / "deep.png")
    assert deep.mode.startswith("I")
    deep_rgb, _ = imageio.read_rgb(tmp_path / "deep.png")
    assert deep_rgb.dtype == np.uint8 and np.array_equal(deep_rgb[..., 0], rgb[..., 1])
    assert imageio.read_rgb(tmp_path / "cut.jpg") == (None, imageio.TRUNCATED)
    assert imageio.read_rgb(tmp_path / "junk.png") == (None, imageio.UNREADABLE)
    assert imageio.read_rgb(tmp_path / "absent.png") == (None, imageio.UNREADABLE)
    mask, _ = imageio.read_mask(tmp_path / "deep.png")
    assert np.array_equal(mask, rgb[..., 1] >= 128)


# ---- instance sources ----------------------------------------------------------------------------------
def test_folder_instances_from_shared_data(shared_data):
    found, skips = real_instances(shared_data)
    assert all(re.fullmatch(r".+-[0-9a-f]{10}", i.id) for i in found)  # each id ends with its files' content hash
    assert sorted(i.id[:-11] for i in found) == [
        "file-dog_bench", "file-paste-000000006818", "file-paste-55_000000138891",
        "file-paste-I-210614_O04019_W01_F0109", "file-room",
    ]
    assert not skips
    room = next(i for i in found if i.id.startswith("file-room-"))
    rgb, mask, reason = inst.load_instance(room)
    assert reason is None and rgb.shape == (256, 256, 3) and abs(mask.mean() - room.area) < 1e-9
    crop_rgb, crop_mask = inst.cut_instance(rgb, mask)
    assert crop_mask.any(axis=0).all() and crop_mask.any(axis=1).all()


def test_coco_polygons_and_rle_match_the_masks(shared_data, tmp_path):
    from pycocotools import mask as mask_utils

    masked = shared_data / "images" / "masked"
    dog = imageio.read_mask(masked / "dog_bench_mask.png")[0]
    room = imageio.read_mask(masked / "room_mask.png")[0]
    contours, _ = cv2.findContours(dog.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygon = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
    compressed = mask_utils.encode(np.asfortranarray(room.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    flat = room.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    uncompressed = {"size": [256, 256], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    coco = {
        "images": [{"id": 1, "file_name": "dog_bench.png", "height": 512, "width": 512},
                   {"id": 2, "file_name": "room.png", "height": 256, "width": 256}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": polygon, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 2, "segmentation": compressed, "bbox": [0, 0, 200, 200], "area": 40000, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 2, "segmentation": uncompressed, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 2, "segmentation": compressed, "bbox": [0, 0, 1, 1], "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "thing"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    found = inst.coco_instances(path, masked)
    file_id = found[0].id.split("-")[1]  # annotation ids are unique only within their file: the file's hash is kept
    assert [(i.id, i.class_name) for i in found] == [(f"coco-{file_id}-10", "dog"), (f"coco-{file_id}-11", "thing"),
                                                     (f"coco-{file_id}-12", "thing")]
    for instance, expected in zip(found, (dog, room, room)):
        rgb, mask, reason = inst.load_instance(instance)
        assert reason is None and mask.shape == expected.shape
        if instance.id.endswith("-10"):  # a polygon traced from the mask covers it up to its outline
            assert (mask & expected).sum() / (mask | expected).sum() > 0.97
        else:
            assert np.array_equal(mask, expected) and instance.area == pytest.approx(expected.mean())
    assert inst.coco_obstacles(path) == {"dog_bench.png": [[0.0, 0.0, 10.0, 10.0]], "room.png": [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 1.0, 1.0]]}

    skips = Skips()
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "none.json").write_text('{"images": [], "annotations": []}')
    (tmp_path / "bad.json").write_text("{oops")
    for name in ("empty.json", "none.json", "bad.json"):
        assert inst.coco_instances(tmp_path / name, masked, skips) == []
    assert skips.as_dict() == {inst.EMPTY_ANNOTATIONS: {"count": 2, "first": ["empty.json", "none.json"]},
                               inst.BAD_ANNOTATIONS: {"count": 1, "first": ["bad.json"]}}


# ---- filters and CLIP ----------------------------------------------------------------------------------
def _fake(name, index, area, score):
    return inst.Instance(id=f"{name}-{index}", class_name=name, image="x.jpg", area=area, score=score)


def test_official_filters_and_class_statistics():
    cats = [_fake("cat", i, 0.1 + 0.01 * i, 25.0 + i) for i in range(6)] + [_fake("cat", 9, 0.5, 0.1)]
    dogs = [_fake("dog", i, 0.2, 0.18) for i in range(6)] + [_fake("dog", 7, 0.97, 0.19), _fake("dog", 8, 0.3, 0.1)]
    birds = [_fake("bird", i, 0.3, 30.0) for i in range(5)]
    kept, stats, report = inst.filter_instances(cats + dogs + birds)
    # cat: bar = min(0.2, 30 - 0.02) = 0.2 drops the 0.1 score; dog: bar = min(0.2, 0.19 - 0.02) = 0.17
    assert sorted(i.id for i in kept if i.class_name == "cat") == [f"cat-{i}" for i in range(6)]
    assert sorted(i.id for i in kept if i.class_name == "dog") == [f"dog-{i}" for i in range(6)]
    assert "bird" not in stats  # 5 < 6 instances
    assert report.dropped == {"clip": 2, "area": 1, "class_count": 5}
    areas = np.array([0.1 + 0.01 * i for i in range(6)])
    assert stats["cat"].mean_area == pytest.approx(areas.mean()) and stats["cat"].var_area == pytest.approx(areas.var())
    kept, stats, report = inst.filter_instances(birds, use_clip=False, use_class_count=False)
    assert len(kept) == 5 and not report.clip and not report.class_count and report.area
    with pytest.raises(ValueError, match="scored"):
        inst.filter_instances([_fake("cat", 0, 0.1, None)])
    order = inst.interleave_by_class(*inst.filter_instances(cats + dogs)[:2])
    assert [i.class_name for i in order[:4]] == ["cat", "dog", "cat", "dog"]


def test_clip_score_is_the_official_logit_scale(tmp_path, shared_data):
    folder = build_tiny_clip(tmp_path / "clip")
    scorer = ClipScorer.from_folder(folder)
    found, _ = real_instances(shared_data)
    images, masks = zip(*[inst.load_instance(i)[:2] for i in found[:2]])
    scores = scorer.score(list(images), list(masks), ["dog", "room"], batch_size=1)
    for image, mask, name, score in zip(images, masks, ["dog", "room"], scores):
        pixels = preprocess(white_background(image, mask), 32)[None]
        tokens = scorer.tokenizer([f"a photo of {name}"], return_tensors="pt")
        with torch.no_grad():
            expected = scorer.model(**tokens, pixel_values=pixels).logits_per_text.item()
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # the white background: outside the mask every pixel is 1.0 before normalisation
    assert torch.all(white_background(images[0], masks[0])[:, ~masks[0]] == 1.0)
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        ClipScorer.from_folder(tmp_path / "missing")


@pytest.mark.parametrize("shape", [(3, 300, 200), (3, 180, 420), (3, 224, 224), (3, 100, 150)])
def test_clip_preprocess_is_torchvisions_transform(shape):
    TF = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    pixels = torch.rand(shape)
    expected = TF.normalize(TF.center_crop(TF.resize(pixels, 224, interpolation=InterpolationMode.BICUBIC,
                                                     antialias=True), [224, 224]), CLIP_MEAN, CLIP_STD)
    assert torch.equal(preprocess(pixels, 224), expected)


# ---- placement ------------------------------------------------------------------------------------------
def test_placement_rules_hold_with_obstacles():
    config = synth.SynthConfig(size=256)
    rng = np.random.default_rng(0)
    low, high = synth.edge_band(256, 0.2)
    accepted = fallbacks = 0
    for trial in range(300):
        obstacles = [[float(v) for v in (*rng.integers(0, 200, 2), *rng.integers(10, 90, 2))] for _ in range(rng.integers(0, 5))]
        w, h = (int(v) for v in rng.integers(20, 200, 2))
        p = synth.place(rng, w, h, 256, obstacles, config)
        cx, cy = p.center
        assert low <= cx < high and low <= cy < high  # never inside the 20 % edge band
        assert p.box[2] == w // p.divisor and p.box[3] == h // p.divisor and 1 <= p.divisor <= 4
        if p.fallback:
            fallbacks += 1
            continue
        accepted += 1
        assert low < cx < high and low < cy < high
        assert synth.obstacle_overlap_ok(p.box, obstacles, 0.5)  # R1
        assert synth.inside_fraction(p.box, 256) >= 0.6  # R2
        for x, y, ow, oh in obstacles:  # the centre is outside every obstacle box
            assert not (x <= cx <= x + ow and y <= cy <= y + oh)
    assert accepted > 200 and fallbacks > 0


def test_area_sampling_and_paste_size():
    rng = np.random.default_rng(0)
    draws = [synth.sample_area(rng, 0.2, 0.01) for _ in range(2000)]
    assert min(draws) >= 0.19 - 1e-12 and max(draws) <= 0.21 + 1e-12  # clamped to mean ± variance
    w, h = synth.paste_size(100, 50, 512, 0.2, [], 0.05)
    assert abs(w * h / 512**2 - 0.2) < 0.01
    w, h = synth.paste_size(100, 50, 512, 0.4, [[0, 0, 512, 300]], 0.05)  # free half = (1 - 300/512) / 2
    assert abs(w * h / 512**2 - (1 - 300 / 512) / 2) < 0.01
    w, h = synth.paste_size(100, 50, 512, 0.001, [], 0.05)  # floor 5 %
    assert abs(w * h / 512**2 - 0.05) < 0.005


def test_trimap_is_the_official_one():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 8:30] = True
    trimap = synth.official_trimap(mask)
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=3) > 0
    assert np.array_equal(trimap == 255, eroded) and np.array_equal(trimap == 128, mask & ~eroded)
    assert np.array_equal(trimap == 0, ~mask) and (trimap == 128).sum() > 0


# ---- whole samples on real photos -------------------------------------------------------------------------
@pytest.mark.parametrize("blend", ["matting", "feather", "hard"])
def test_pasted_samples_on_real_photos(shared_data, tmp_path, blend):
    found, _ = real_instances(shared_data)
    backgrounds, _, _ = synth.collect_backgrounds(shared_data / "images" / "removal_pairs")
    # an obstacle file for the backgrounds: a box in the middle of each photo
    obstacles = {p: [[250.0, 150.0, 120.0, 100.0]] for p in backgrounds}
    config = synth.SynthConfig(size=384, blend=blend)
    plan = synth.build_plan(backgrounds, obstacles, found, config, seed=3, num_samples=4 if blend == "matting" else 8,
                            filters={"use_class_count": False})
    assert plan.filters["clip"] is False and plan.filters["area"] is True and plan.filters["class_count"] is False
    summary = synth.run_synthesis(plan, tmp_path)
    assert summary["written"] == plan.num_samples and summary["skipped"] == {}
    dataset = TripletDataset(tmp_path)
    low, high = synth.edge_band(384, 0.2)
    for item in (dataset[i] for i in range(len(dataset))):
        record, params = item["record"], item["record"]["params"]
        background, transform = synth.prepare_background(imageio.read_rgb(record["background"])[0], 384)
        assert np.array_equal(item["target"], background)  # target is the untouched background, exactly
        assert np.array_equal(item["source"][~item["mask"]], background[~item["mask"]])
        assert item["mask"].mean() > 0.01
        changed = np.any(item["source"] != background, axis=2)
        assert changed.sum() > 0.5 * item["mask"].sum()  # the object is really there
        assert record["origin"]["kind"] == "image" and record["origin"]["instance"].startswith("file-")
        assert params["blend"] == blend and -45 <= params["rotation"] <= 45
        cx, cy = params["center"]
        assert low <= cx < high and low <= cy < high
        crop_obstacles = synth.transform_boxes(obstacles[record["background"]], transform, 384)
        assert params["obstacles"] == [[round(v, 3) for v in b] for b in crop_obstacles]
        if not params["fallback"]:
            assert synth.obstacle_overlap_ok(params["box"], crop_obstacles, 0.5)
            assert synth.inside_fraction(params["box"], 384) >= 0.6
        # the pasted object sits inside its rotated box around the centre
        ys, xs = np.nonzero(item["mask"])
        radius = 0.5 * np.hypot(params["box"][2], params["box"][3]) + 2
        assert np.hypot(xs - cx, ys - cy).max() <= radius


def test_matting_alpha_is_soft_only_in_the_band(shared_data):
    background = synth.prepare_background(imageio.read_rgb(shared_data / "images" / "removal_pairs" / "unwant_person_clean.jpg")[0], 256)[0]
    rgb, mask, _ = inst.load_instance(inst.folder_instances(shared_data / "images" / "masked")[0])
    rgb, mask = inst.cut_instance(rgb, mask)
    rgb, mask = synth.resize_instance(rgb, mask, 100, 100)
    composite, pasted = synth.paste_binary(background, rgb, mask, (128, 128))
    alpha, used = synth.matting_alpha(composite, pasted)
    trimap = synth.official_trimap(pasted)
    assert used == "matting" and np.all(alpha[trimap == 0] == 0) and np.all(alpha[trimap == 255] == 1)
    band = alpha[trimap == 128]
    assert 0 <= band.min() and band.max() <= 1 and (0 < band).mean() > 0.5
    feather = synth.feather_alpha(pasted, 3)
    assert np.array_equal(feather > 0, pasted) and feather.max() == 1


def test_bad_files_are_skipped_and_counted(shared_data, tmp_path):
    from PIL import Image

    photos = tmp_path / "bg"
    photos.mkdir()
    good = Image.open(shared_data / "images" / "removal_pairs" / "unwant_person_clean.jpg")
    good.save(photos / "a_good.jpg")
    good.convert("L").save(photos / "b_gray.png")
    good.convert("RGBA").save(photos / "c_rgba.png")
    Image.fromarray((np.asarray(good.convert("L")).astype(np.uint16) * 257)).save(photos / "d_deep.png")
    data = (photos / "a_good.jpg").read_bytes()
    (photos / "e_cut.jpg").write_bytes(data[: len(data) // 3])
    good.resize((100, 80)).save(photos / "f_small.jpg")
    (photos / "g_junk.jpg").write_bytes(b"\x00" * 100)
    found, _ = real_instances(shared_data)
    backgrounds, obstacles, _ = synth.collect_backgrounds(photos)
    plan = synth.build_plan(backgrounds, obstacles, found, synth.SynthConfig(size=256, blend="hard"), num_samples=7,
                            filters={"use_class_count": False})
    summary = synth.run_synthesis(plan, tmp_path / "out")
    assert summary["written"] == 7 and summary["redrawn"] == 3 and summary["failed"] == {}  # drawn again
    assert summary["skipped"] == {imageio.TRUNCATED: {"count": 1, "first": ["e_cut.jpg"]},
                                  synth.TOO_SMALL: {"count": 1, "first": ["f_small.jpg"]},
                                  imageio.UNREADABLE: {"count": 1, "first": ["g_junk.jpg"]}}
    records = TripletDataset(tmp_path / "out").records
    assert len(records) == 7 and sorted(r["params"].get("draw", 0) > 0 for r in records) == [False] * 4 + [True] * 3
    assert not {"e_cut.jpg", "f_small.jpg", "g_junk.jpg"} & {r["background"].rsplit("/", 1)[-1] for r in records}


def test_background_annotations_become_obstacles_in_crop_coordinates(shared_data, tmp_path):
    pairs = shared_data / "images" / "removal_pairs"
    coco = {
        "images": [{"id": 1, "file_name": "unwant_person.jpg", "height": 800, "width": 800}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 200, 160, 80], "area": 9000},  # 1.4 %: obstacle
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 800, 700], "area": 500000},  # 78 %: not one
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "bg.json").write_text(json.dumps(coco))
    paths, obstacles, skips = synth.collect_backgrounds(pairs, tmp_path / "bg.json")
    person = str(pairs / "unwant_person.jpg")
    assert person in paths and obstacles == {person: [[100.0, 200.0, 160.0, 80.0]]} and not skips
    found, _ = real_instances(shared_data)
    plan = synth.build_plan([person], obstacles, found, synth.SynthConfig(size=400, blend="hard"), num_samples=5,
                            filters={"use_class_count": False})
    for index in range(5):
        _, sample, record, problems = synth.make_sample(plan, index)
        assert problems == []
        assert record["params"]["obstacles"] == [[50.0, 100.0, 80.0, 40.0]]  # 800 → 400: scale 0.5, no crop offset
        if not record["params"]["fallback"]:
            assert synth.obstacle_overlap_ok(record["params"]["box"], [[50.0, 100.0, 80.0, 40.0]], 0.5)
