"""GroundingDINO / SAM / SAM 2 adapters (dataset_tools/segmenters.py) on tiny random transformers models."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.dataset_tools import segmenters as S
from erasekit.dataset_tools import video_mining as V

_spec = importlib.util.spec_from_file_location(
    "erasekit_tiny_segmenters_unit", Path(__file__).parent / "comfy" / "tiny" / "segmenters.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmenters")
    return {
        "dino": tiny.build_grounding_dino(root / "dino"),
        "sam": tiny.build_sam(root / "sam"),
        "sam2": tiny.build_sam2(root / "sam2"),
        "sam_checkpoint": tiny.build_segment_anything_checkpoint(root / "sam_vit_tiny.pth"),
    }


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    picture = (rng.random((90, 120, 3)) * 60 + 90).astype(np.uint8)
    picture[30:60, 40:90] = (200, 40, 40)
    return picture


def test_prompt_normalisation():
    assert S.GroundingDino.normalize_prompt("Car, Person") == "car. person."
    assert S.GroundingDino.normalize_prompt("car.") == "car."
    with pytest.raises(ValueError, match="prompt"):
        S.GroundingDino.normalize_prompt("  ")


def test_grounding_dino_matches_a_direct_transformers_run(folders, image):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    detector = S.load_grounding_dino(folders["dino"])
    found = detector.detect(image, "Car", box_threshold=0.0, text_threshold=0.0)
    assert found, "a threshold of 0 keeps every query"
    for detection in found:
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 90
        assert "car" in detection.label
    processor = AutoProcessor.from_pretrained(str(folders["dino"]))
    model = AutoModelForZeroShotObjectDetection.from_pretrained(str(folders["dino"])).eval()
    inputs = processor(images=image, text="car.", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    reference = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[image.shape[:2]])[0]
    assert len(found) == len(reference["scores"])
    np.testing.assert_allclose([d.score for d in found], reference["scores"].numpy(), rtol=1e-5)
    assert detector.detect(image, "car", box_threshold=1.01) == []


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_segment_boxes_match_a_direct_transformers_run(folders, image, kind):
    from transformers import AutoModel, AutoProcessor

    sam = S.load_sam(folders[kind])
    assert sam.kind == kind
    boxes = [(10, 10, 60, 50), (40, 30, 90, 60)]
    masks = sam.segment_boxes(image, boxes)
    assert masks.shape == (2, 90, 120) and masks.dtype == bool
    processor = AutoProcessor.from_pretrained(str(folders[kind]))
    model = AutoModel.from_pretrained(str(folders[kind])).eval()
    inputs = processor(images=image, input_boxes=[[list(map(float, b)) for b in boxes]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    if kind == "sam2":
        reference = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])[0]
    else:
        reference = processor.image_processor.post_process_masks(
            outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    np.testing.assert_array_equal(masks, reference[:, 0].numpy().astype(bool))
    assert sam.segment_boxes(image, []).shape == (0, 90, 120)
    with pytest.raises(ValueError, match="x1 > x0"):
        sam.segment_boxes(image, [(50, 10, 20, 40)])
    with pytest.raises(ValueError, match="uint8"):
        sam.segment_boxes(image.astype(np.float32), boxes)


def test_segment_anything_checkpoint_matches_its_own_predictor(folders, image):
    """A models/sams checkpoint: architecture read from the weights, masks equal to SamPredictor's."""
    from segment_anything import SamPredictor

    state = S.load_state_dict(folders["sam_checkpoint"])
    assert S.segment_anything_config(state) == tiny.SEGMENT_ANYTHING_CONFIG
    sam = S.load_sam(folders["sam_checkpoint"])
    assert sam.kind == "sam"
    boxes = [(10, 10, 60, 50), (40, 30, 90, 60)]
    masks = sam.segment_boxes(image, boxes)
    assert masks.shape == (2, 90, 120) and masks.dtype == bool
    predictor = SamPredictor(S.build_segment_anything(state))
    predictor.set_image(image)
    for mask, box in zip(masks, boxes):
        reference, _, _ = predictor.predict(box=np.array(box, dtype=np.float32), multimask_output=False)
        np.testing.assert_array_equal(mask, reference[0])
    proposals, scores = sam.propose_masks(image, points_per_side=3, score_threshold=-1e9, min_area_fraction=0.0)
    assert len(proposals) == len(scores) >= 1


@pytest.mark.parametrize("kind", ["sam", "sam2", "sam_checkpoint"])
def test_propose_masks_are_distinct_scored_and_large_enough(folders, image, kind):
    sam = S.load_sam(folders[kind])
    masks, scores = sam.propose_masks(image, points_per_side=4, score_threshold=-1e9, min_area_fraction=0.01,
                                      max_overlap=0.5, batch_size=5)
    assert masks.shape[1:] == (90, 120) and len(masks) == len(scores) >= 1
    assert list(scores) == sorted(scores, reverse=True)
    assert all(m.mean() >= 0.01 for m in masks)
    for i in range(len(masks)):
        for j in range(i):
            assert S.mask_iou(masks[i], masks[j]) <= 0.5
    none, _ = sam.propose_masks(image, points_per_side=2, score_threshold=1e9)
    assert none.shape == (0, 90, 120)


def test_loaders_reject_wrong_models_and_files(folders, tmp_path):
    with pytest.raises(ValueError, match="not GroundingDINO"):
        S.load_grounding_dino(folders["sam"])
    with pytest.raises(ValueError, match="not SAM"):
        S.load_sam(folders["dino"])
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        S.load_sam(checkpoint)
    sam2_like = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(1)}}, sam2_like)
    with pytest.raises(ValueError, match="SAM 2 checkpoint"):
        S.load_sam(sam2_like)
    with pytest.raises(ValueError, match="single checkpoint file"):
        S.load_grounding_dino(folders["sam_checkpoint"])
    with pytest.raises(FileNotFoundError):
        S.load_sam(tmp_path / "absent")


def test_text_segmenter_keeps_objects_in_the_motion_zone(folders, image):
    segmenter = S.load_text_segmenter(folders["dino"], folders["sam2"], "car", box_threshold=0.0, text_threshold=0.0)
    assert segmenter.name == "grounding_dino+sam2"
    anywhere = segmenter(image)
    if anywhere is not None:
        assert anywhere.shape == (90, 120) and anywhere.dtype == bool
        assert segmenter(image, np.zeros((90, 120), bool)) is None  # nothing moved: nothing to cut out
        inside = segmenter(image, anywhere)
        assert inside is not None and not (inside & ~anywhere).any()


def test_video_pairs_take_their_masks_from_the_segmenter(folders, road_video):
    video = road_video
    # random weights cut out arbitrary regions: accept them wherever they lie, so pairs come through
    segmenter = S.TextSegmenter(S.load_grounding_dino(folders["dino"]), S.load_sam(folders["sam"]), "car",
                                box_threshold=0.0, text_threshold=0.0, min_zone_overlap=0.0)
    pairs, report = V.run_mining(video, V.PairingConfig(foreground_ratio=0.04), segmenter=segmenter, stop=100)
    assert report.status == "ok"
    assert pairs, report.counts
    for pair in pairs:
        assert pair.stats["mask_source"] == "grounding_dino+sam"
        assert pair.mask.shape == pair.source.shape[:2] and pair.mask.any()


@pytest.fixture
def tiny_sam2_variant(monkeypatch):
    monkeypatch.setitem(S.SAM2_VARIANTS, tiny.SAM2_TINY_KEY, tiny.SAM2_TINY_VARIANT)


@pytest.mark.parametrize("name", ["sam2.1_hiera_test.pt", "sam2_hiera_test.safetensors"])
def test_sam2_checkpoint_matches_transformers_on_the_same_weights(tmp_path, image, tiny_sam2_variant, name):
    """A models/sam2 checkpoint in Meta's layout: variant read from the weights, masks equal a direct run."""
    import transformers as T

    version = "2.1" if name.startswith("sam2.1") else "2"
    path = tiny.build_sam2_checkpoint(tmp_path / name, version=version)
    state = S.load_state_dict(path)
    assert "sam_prompt_encoder.point_embeddings.3.weight" in state  # Meta's names, not transformers'
    assert "image_encoder.neck.convs.0.conv.weight" in state and "image_encoder.trunk.blocks.4.attn.qkv.weight" in state
    config, variant, found_version = S.sam2_config(state)
    assert (variant, found_version) == ("test-tiny", version)
    expected = tiny.sam2_checkpoint_config()
    assert config.vision_config.backbone_config.to_dict() == expected.vision_config.backbone_config.to_dict()
    assert config.mask_decoder_config.to_dict() == expected.mask_decoder_config.to_dict()
    sam = S.load_sam(path)
    assert sam.kind == "sam2" and sam.backend.version == version
    torch.manual_seed(0)  # the builder's seed: the same random weights, straight into transformers
    reference_model = T.Sam2Model(expected).eval()
    processor = T.Sam2Processor(image_processor=T.Sam2ImageProcessor())
    boxes = [(10, 10, 60, 50), (40, 30, 90, 60)]
    masks = sam.segment_boxes(image, boxes)
    inputs = processor(images=image, input_boxes=[[list(map(float, b)) for b in boxes]], return_tensors="pt")
    with torch.no_grad():
        outputs = reference_model(**inputs, multimask_output=False)
    reference = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])[0][:, 0].numpy()
    assert masks.shape == (2, 90, 120) and reference.any() and not reference.all()
    np.testing.assert_array_equal(masks, reference.astype(bool))
    proposals, scores = sam.propose_masks(image, points_per_side=3, score_threshold=-1e9, min_area_fraction=0.0)
    assert len(proposals) == len(scores) >= 1 and proposals.shape[1:] == (90, 120)


@pytest.mark.parametrize("name", ["tiny", "small", "base_plus", "large"])
def test_sam2_variants_are_recognised_from_their_weights(name):
    """Each released Hiera variant's checkpoint shapes (on the meta device: no memory) give back its config."""
    import transformers as T

    (width, stages), variant = next((k, v) for k, v in S.SAM2_VARIANTS.items() if v["name"] == name)
    widths = [width * 2 ** i for i in range(4)]
    config = T.Sam2Config(vision_config=T.Sam2VisionConfig(
        backbone_config=T.Sam2HieraDetConfig(
            hidden_size=width, blocks_per_stage=list(stages), embed_dim_per_stage=widths,
            num_attention_heads_per_stage=variant["heads"], window_size_per_stage=variant["windows"],
            global_attention_blocks=variant["global"],
            window_positional_embedding_background_size=[14, 14] if name == "base_plus" else [7, 7]),
        backbone_channel_list=widths[::-1]))
    with torch.device("meta"):
        model = T.Sam2Model(config)
    state = tiny.sam2_original_state(model, version="2")
    found, found_name, version = S.sam2_config(state)
    assert (found_name, version) == (name, "2")
    assert found.vision_config.to_dict() == config.vision_config.to_dict()
    assert found.mask_decoder_config.to_dict() == config.mask_decoder_config.to_dict()
    assert found.prompt_encoder_config.to_dict() == config.prompt_encoder_config.to_dict()
    assert set(S.sam2_state_to_transformers(state)) == set(model.state_dict())
