"""erasekit-eval's metrics on images with known answers, the learned metrics on random local weights, the command."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.evaluation import learned, metrics
from erasekit.evaluation.cli import main as eval_main
from erasekit.jobs import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def gray(value, shape=(64, 64, 3)):
    return np.full(shape, value, np.uint8)


# ------------------------------------------------------------------------------------------------ no weights
def test_identical_images_give_infinite_psnr_and_ssim_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    mask = np.zeros((48, 40), bool)
    mask[10:20, 10:30] = True
    values = metrics.pixel_metrics(image, image.copy(), mask, dilation=4)
    assert values["psnr"] == math.inf and values["psnr_masked"] == math.inf and values["psnr_unmasked"] == math.inf
    assert values["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_gaussian_noise_gives_the_psnr_of_its_sigma():
    """Noise of σ = 10 grey levels on mid-grey (no clipping): MSE = σ² (+1/12 from rounding to integers), so
    PSNR = 20·log10(255/σ) = 28.13 dB."""
    rng = np.random.default_rng(1)
    target = gray(128, (512, 512, 3))
    noisy = np.clip(np.round(target + rng.normal(0, 10, target.shape)), 0, 255).astype(np.uint8)
    assert metrics.psnr(noisy, target) == pytest.approx(20 * math.log10(255 / 10), abs=0.03)
    assert metrics.psnr(noisy, target) == pytest.approx(10 * math.log10(255 ** 2 / (100 + 1 / 12)), abs=0.03)


def test_psnr_inside_and_outside_the_dilated_mask_by_hand():
    """20×20 image, 2×2 mask: error 10 inside the mask, 1 everywhere else. Grown by 1 px (a 3×3 disc: the cross)
    the mask covers 12 pixels: 4 with squared error 100, 8 with 1, so MSE = 408/12 = 34; outside, 388 pixels of 1."""
    target = np.zeros((20, 20, 3), np.uint8)
    result = np.ones((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[4:6, 4:6] = True
    result[mask] = 10
    assert metrics.dilate(mask, 1).sum() == 12
    values = metrics.pixel_metrics(result, target, mask, dilation=1)
    assert values["psnr_masked"] == pytest.approx(10 * math.log10(255 ** 2 / 34))
    assert values["psnr_unmasked"] == pytest.approx(10 * math.log10(255 ** 2 / 1))
    undilated = metrics.pixel_metrics(result, target, mask, dilation=0)
    assert undilated["psnr_masked"] == pytest.approx(10 * math.log10(255 ** 2 / 100))
    assert math.isnan(metrics.psnr(result, target, np.zeros((20, 20), bool)))  # an empty region has no PSNR
    assert math.isnan(metrics.ssim(result[:10, :10], target[:10, :10]))  # smaller than one 11×11 window


def test_ssim_of_two_flat_images_is_the_luminance_term():
    """σ = 0 everywhere, so SSIM = (2ab + C1) / (a² + b² + C1) with C1 = (0.01·255)²."""
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(gray(100), gray(120)) == pytest.approx((2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1))


def test_ssim_matches_torchmetrics_inside_the_border():
    """torchmetrics' SSIM map, without the 5 px border that Wang et al.'s reference code (a 'valid' filter) and
    skimage leave out and torchmetrics fills by reflection."""
    torchmetrics = pytest.importorskip("torchmetrics")
    import torch

    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    _, full = torchmetrics.functional.image.structural_similarity_index_measure(
        torch.from_numpy(a).permute(2, 0, 1)[None].double(), torch.from_numpy(b).permute(2, 0, 1)[None].double(),
        data_range=255.0, return_full_image=True)
    assert metrics.ssim(a, b) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-9)


def test_size_mismatch_is_an_error_naming_both_sizes():
    with pytest.raises(ValueError, match="64×64 but the reference is 32×32"):
        metrics.psnr(gray(0), gray(0, (32, 32, 3)))


# ------------------------------------------------------------------------------------------------ learned
def test_cmmd_estimator_by_hand():
    """One embedding each, distance r apart: k_xx = k_yy = 1, k_xy = exp(-r²/2σ²), so CMMD = 1000·2·(1 - k_xy)."""
    x, y = np.zeros((1, 4)), np.array([[3.0, 4.0, 0, 0]])
    assert learned.mmd(x, y) == pytest.approx(1000 * 2 * (1 - math.exp(-25 / 200)))
    assert learned.mmd(x, x) == 0.0


def test_remove_crop_and_score_by_hand():
    mask = np.zeros((100, 100), bool)
    mask[40:50, 30:60] = True  # 30 wide, 10 high → a 30 px square, 16 px margin
    assert learned.bounding_square(mask) == (14, 24, 62)
    mask[:] = False
    mask[2:10, 80:95] = True  # near the top edge: the margin shrinks to the nearest border distance (2)
    assert learned.bounding_square(mask) == (78, 0, 19)
    assert learned.bounding_square(np.zeros((5, 5), bool)) is None
    features = np.zeros((2, 4, 4))
    features[0] = 1.0  # outside: (1, 0)
    grid = np.zeros((4, 4), bool)
    grid[1:3, 1:3] = True
    features[:, grid] = np.array([[1.0], [1.0]])  # inside: (1, 1) → cos 45°
    assert learned.remove_from_features(features, grid) == pytest.approx(math.sqrt(0.5))
    assert math.isnan(learned.remove_from_features(features, np.zeros((4, 4), bool)))


def test_missing_weights_say_which_file_and_where_to_get_it(tmp_path):
    pytest.importorskip("torchmetrics")
    with pytest.raises(learned.WeightsNotFound, match=r"alexnet.*download https://download\.pytorch\.org/.*alexnet"):
        learned.Lpips(tmp_path / "alexnet.pth", "alex")
    pytest.importorskip("torch_fidelity")
    with pytest.raises(learned.WeightsNotFound, match=learned.INCEPTION_FILE):
        learned.Fid(tmp_path / "nothing.pth")
    with pytest.raises(learned.WeightsNotFound, match="clip-vit-large-patch14-336"):
        learned.ClipEmbedder(tmp_path)
    with pytest.raises(learned.WeightsNotFound, match="sam_vit_h_4b8939"):
        learned.Remove(tmp_path / "sam.pth")


@pytest.fixture(scope="module")
def squeezenet_weights(tmp_path_factory):
    """Random weights of LPIPS' smallest torchvision backbone, saved like torchvision's download."""
    pytest.importorskip("torchmetrics")
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "random_squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


def test_lpips_runs_torchmetrics_on_the_local_backbone(squeezenet_weights):
    import torch

    lpips = learned.Lpips(squeezenet_weights, "squeeze")
    backbone = torch.load(squeezenet_weights, weights_only=True)
    assert any(torch.equal(p, backbone["features.0.weight"]) for p in lpips.metric.parameters())  # the local file
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    assert lpips(a, a) == pytest.approx(0.0, abs=1e-6)
    assert lpips(a, b) > 0 and lpips(a, b) == pytest.approx(lpips(b, a), rel=1e-5)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights (its constructor always loads weights: they are skipped
    here once, to make the file), saved as its weights file is."""
    pytest.importorskip("torchmetrics")
    pytest.importorskip("torch_fidelity")
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    patch = pytest.MonkeyPatch()
    patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    model = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    patch.undo()
    for module in model.modules():  # He initialisation keeps 90+ random layers from fading to constant features
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / learned.INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


def test_fid_is_zero_for_one_set_and_grows_with_noise(inception_weights):
    """On Inception's 64-channel features (the 2048 of pool3 cost a 2048² eigen-decomposition per FID)."""
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    same = learned.Fid(inception_weights, features=64)
    for image in images:
        same.add(image, real=True)
        same.add(image, real=False)
    assert same.compute() == pytest.approx(0.0, abs=1e-2)
    noisy = learned.Fid(inception_weights, features=64)
    for image in images:
        noisy.add(image, real=True)
        noisy.add(np.clip(image.astype(int) + rng.integers(-80, 81, image.shape), 0, 255).astype(np.uint8), real=False)
    assert noisy.compute() > 1e-3
    lonely = learned.Fid(inception_weights, features=64)
    lonely.add(images[0], real=True)
    lonely.add(images[0], real=False)
    assert math.isnan(lonely.compute())


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    import transformers as T

    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    config = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, projection_dim=16)
    T.CLIPVisionModelWithProjection(config).eval().save_pretrained(str(path))
    return path


def test_cmmd_embeddings_from_a_local_clip(clip_folder):
    embed = learned.ClipEmbedder(clip_folder)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    vector = embed(image)
    assert vector.shape == (16,) and np.linalg.norm(vector) == pytest.approx(1.0)
    assert embed.prepare(image).shape == (32, 32, 3)  # centre square, resized to the model's input
    other = [embed(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    assert learned.mmd([vector, *other], [vector, *other]) == pytest.approx(0.0, abs=1e-9)
    assert learned.mmd([vector, vector], other) > 0


def _tiny_sam_checkpoint(path):
    """A random segment-anything checkpoint at 256 px: a 16×16 feature grid (the real SAM's is 64×64)."""
    spec = importlib.util.spec_from_file_location(
        "erasekit_tiny_segmenters_eval", Path(__file__).parent / "comfy" / "tiny" / "segmenters.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.build_segment_anything_checkpoint(path, img_size=256)


def test_remove_on_a_tiny_segment_anything(tmp_path):
    pytest.importorskip("segment_anything")
    remove = learned.Remove(_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth"))
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[40:90, 30:100] = True
    score = remove(image, mask)
    assert -1.0 <= score <= 1.0 and score == remove(image, mask)
    # the score is the cosine of SAM's mean features inside vs outside the mask on the cropped square
    x, y, size = learned.bounding_square(mask)
    remove.predictor.set_image(np.ascontiguousarray(image[y:y + size, x:x + size]))
    grid = np.asarray(Image.fromarray(mask[y:y + size, x:x + size].astype(np.uint8) * 255).resize((16, 16))) // 255
    assert grid.any() and not grid.all()
    assert score == pytest.approx(learned.remove_from_features(remove.predictor.get_image_embedding()[0], grid > 0))
    assert math.isnan(remove(image, np.zeros((128, 128), bool)))


# ------------------------------------------------------------------------------------------------ the command
def _bench(root, count=6, seed=7):
    """A RemovalBench-layout folder (images/ masks/ gt/) and results with growing noise inside the masks."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "gt", "results"):
        (root / sub).mkdir(parents=True)
    for i in range(count):
        clean = rng.integers(40, 200, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), bool)
        mask[10:30, 20:40] = True
        photo = clean.copy()
        photo[mask] = (255, 0, 0)
        result = clean.copy()
        result[mask] = np.clip(clean[mask].astype(int) + rng.normal(0, 4 * (i + 1), (mask.sum(), 3)), 0, 255)
        Image.fromarray(photo).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"s{i}.png")
        Image.fromarray(clean).save(root / "gt" / f"s{i}.jpg", quality=100)
        Image.fromarray(result).save(root / "results" / f"s{i}.png")


def test_command_on_removalbench_layout_writes_csv_markdown_and_picture(tmp_path, capsys):
    _bench(tmp_path)
    code = eval_main([str(tmp_path / "results"), "--reference", str(tmp_path), "--dilate", "0", "--quiet",
                      "--lpips-net", "squeeze", "-o", str(tmp_path / "eval")])
    assert code == EXIT_OK
    rows = (tmp_path / "eval" / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("id,psnr,ssim,psnr_masked,psnr_unmasked") and len(rows) == 7
    masked = [float(r.split(",")[3]) for r in rows[1:]]
    assert masked == sorted(masked, reverse=True)  # more noise, lower PSNR in the mask
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "| PSNR in mask (dB) ↑ |" in summary and "6 images scored, 0 without a result, 0 failed" in summary
    assert "ReMOVE not computed" in summary and "CMMD not computed" in summary
    assert summary.split("\n", 2)[2] in capsys.readouterr().out
    picture = Image.open(tmp_path / "eval" / "report.png")
    assert picture.mode == "RGB" and picture.height > 5 * 160  # five rows of worst images under the histograms


def test_command_counts_missing_results_and_reads_triplet_datasets(tmp_path, capsys):
    from erasekit.dataset_tools.triplets import TripletWriter

    rng = np.random.default_rng(8)
    with TripletWriter(tmp_path / "triplets") as writer:
        for i in range(3):
            clean = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            mask = np.zeros((40, 40), bool)
            mask[5:15, 5:15] = True
            writer.write(f"t{i}", clean, mask, clean, {"origin": {"kind": "image", "image": "x", "instance": i}})
    (tmp_path / "results").mkdir()
    for i in range(2):  # t2 has no result
        Image.open(tmp_path / "triplets" / "target" / f"t{i}.png").save(tmp_path / "results" / f"t{i}.png")
    code = eval_main([str(tmp_path / "results"), "--reference", str(tmp_path / "triplets"), "--quiet"])
    assert code == EXIT_FAILED
    text = (tmp_path / "results" / "erasekit-eval" / "per_image.csv").read_text()
    assert "t0,inf,1," in text and "t2," in text and "no result with this name" in text
    assert "2 images scored, 1 without a result" in capsys.readouterr().out


def test_command_refuses_a_missing_folder(tmp_path):
    assert eval_main([str(tmp_path / "nope"), "--reference", str(tmp_path), "--quiet"]) == EXIT_USAGE
