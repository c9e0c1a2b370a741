"""``erasekit-train flux`` on a tiny random FLUX and a tiny triplet dataset built from ../shared/data.

Long CPU runs compute in fp32 (``--mixed-precision no``); the kill-and-resume run keeps the default ``auto`` (bf16
only where the CPU runs it natively) and the 16gb memory plan (fp8 frozen weights, gradient checkpointing).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from erasekit.erasers import omnieraser as oe  # noqa: E402
from erasekit.train import cli, flux, lora  # noqa: E402
from erasekit.train import eraser_lora as core  # noqa: E402
from erasekit.train.datasets import PairedCropDataset  # noqa: E402

_spec = importlib.util.spec_from_file_location("tiny_diffusers_flux",
                                               Path(__file__).parent / "comfy" / "tiny" / "_diffusers_flux.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

SHORT_SIDE = 96  # the dataset is stored small; crops of 64 px still hold most of each object
CROP = 64
SYN = ("000000006818", "55_000000138891", "I-210614_O04019_W01_F0109")
PAIRS = ("unwant_object", "unwant_person", "unwant_text")


def _rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _small(source, mask, target):
    h, w = source.shape[:2]
    scale = SHORT_SIDE / min(h, w)
    size = (round(w * scale), round(h * scale))
    return (cv2.resize(source, size, interpolation=cv2.INTER_AREA),
            cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0,
            cv2.resize(target, size, interpolation=cv2.INTER_AREA))


def difference_mask(source, target, threshold=40):
    """Mask of a before/after pair: pixels that changed, closed so the object is one region."""
    changed = np.abs(source.astype(np.int16) - target.astype(np.int16)).max(-1) > threshold
    return cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8)) > 0


def build_triplets(shared, root):
    """Six real pairs: three SmartEraser syn_triplets and three IOPaint removal pairs (mask = difference)."""
    from erasekit.dataset_tools.triplets import TripletWriter

    images = shared / "images"
    with TripletWriter(root) as writer:
        for stem in SYN:
            mask = cv2.imread(str(images / "syn_triplets" / "mask" / f"{stem}.jpg"), cv2.IMREAD_GRAYSCALE) > 127
            parts = _small(_rgb(images / "syn_triplets" / "paste" / f"{stem}.jpg"), mask,
                           _rgb(images / "syn_triplets" / "gt" / f"{stem}.jpg"))
            writer.write(stem, *parts, {"origin": {"kind": "image", "image": stem, "instance": 0}})
        for stem in PAIRS:
            source, target = _rgb(images / "removal_pairs" / f"{stem}.jpg"), _rgb(images / "removal_pairs" / f"{stem}_clean.jpg")
            parts = _small(source, difference_mask(source, target), target)
            writer.write(stem, *parts, {"origin": {"kind": "image", "image": stem, "instance": 0}})
    return root


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("train_flux")
    model = tiny.save_random_flux_folder(base / "flux", hidden_heads=4, head_dim=32)
    data = build_triplets(shared_data, base / "triplets")
    return {"model": str(model), "data": str(data), "base": base}


def _args(setup, output, *extra, steps=8):
    return ["flux", "--model", setup["model"], "--data", setup["data"], "--output", str(output),
            "--steps", str(steps), "--resolution", str(CROP), "--max-sequence-length", "16",
            "--validation-steps", "0", "--save-dtype", "fp32", *extra]


def _heldout(setup, adapter):
    """(moments, mask) of the held-out sample as the trainer encodes it."""
    data = core.open_training_data([setup["data"]], core.EraserJob(resolution=CROP))
    held = core.heldout_batch(data.heldout)
    return core.encode_moments(adapter, held["source"], held["mask"], held["target"]), held["mask"]


def _adapter(setup, transformer=None, vae=None):
    if transformer is None:
        transformer, vae, _ = flux.load_flux(setup["model"], "cpu", torch.float32)
    return flux.DiffusersFlux(transformer, vae, flux.encode_caption(setup["model"], max_sequence_length=16), "cpu")


def trivial_loss(moments, repeats=4, seed=0):
    """Loss of the best input-blind predictor: the velocity's own per-channel variance on the same draws."""
    values = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(seed + r)
        latents = core.sample_latents(moments, g)
        velocity = torch.randn(latents["target"].shape, generator=g) - latents["target"]
        values.append(float(((velocity - velocity.mean((0, 2, 3), keepdim=True)) ** 2).mean()))
    return float(np.mean(values))


def test_latents_are_drawn_from_the_vae_posterior(setup):
    """Like the official trainer's ``latent_dist.sample()``: every draw differs, around the mean, by the std."""
    moments, _ = _heldout(setup, _adapter(setup))
    draws = [core.sample_latents(moments, torch.Generator().manual_seed(s))["target"] for s in range(2)]
    mean = core.oe.normalize_flux_latent(moments["target_mean"])
    assert moments["target_std"].min() > 0 and not torch.equal(draws[0], draws[1])
    scaled_std = moments["target_std"] * core.oe.FLUX_LATENT_SCALE
    assert ((draws[0] - mean) / scaled_std).std() == pytest.approx(1.0, abs=0.2)


def test_training_lowers_the_loss_and_the_lora_loads_everywhere(setup, tmp_path):
    out = tmp_path / "run"
    code = cli.main(_args(setup, out, "--memory-plan", "full", "--mixed-precision", "no", "--grad-accum", "1", "--lr", "1e-2",
                          "--lr-scheduler", "constant", "--cache-latents", "2", "--checkpoint-every", "0",
                          "--validate-every", "100", steps=300))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    adapter = _adapter(setup)
    moments, mask = _heldout(setup, adapter)
    fresh = lora.LoraSlots(adapter.lora_targets(), 32, 32).attach()  # lora_B = 0: FLUX itself, read 256 wide
    before = core.heldout_loss(core.EraserModel(adapter, fresh), moments, mask, 0)
    blind = trivial_loss(moments)
    # Threshold: 5 % under the best input-blind predictor (the velocity's per-channel variance on the same
    # draws). Reaching it means the LoRA reads x_t and the 48-channel condition; the untrained model (zero
    # LoRA, random FLUX) starts ~35 % above it, and just learning the output mean only gets down to it.
    assert summary["heldout_loss"] < 0.95 * blind, (summary, blind, before)
    assert blind < before
    assert (out / "loss_curve.png").stat().st_size > 1000 and any((out / "logs").iterdir())

    state = lora.load_lora_file(out / flux.LORA_FILE)
    assert state["transformer.x_embedder.lora_A.weight"].shape == (32, 256)
    assert all(k.startswith("transformer.") for k in state)
    # The OmniEraser loader maps every key (geometry of this tiny FLUX: hidden 128, mlp ×4).
    assert oe.unmatched_keys(state, depth=1, depth_single=1, hidden=128, mlp_ratio=4.0) == []
    # diffusers' own loader widens x_embedder and reproduces the trainer's held-out loss.
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(setup["model"], torch_dtype=torch.float32)
    pipe.load_lora_weights(str(out / flux.LORA_FILE))
    assert pipe.transformer.x_embedder.in_features == 256
    reloaded = _adapter(setup, pipe.transformer, pipe.vae)
    assert core.heldout_loss(core.EraserModel(reloaded, None), moments, mask, 0) == pytest.approx(
        summary["heldout_loss"], rel=1e-4)


def _run_cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "erasekit.train.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(setup, tmp_path):
    common = ("--grad-accum", "2", "--lr", "1e-3", "--checkpoint-every", "2", "--keep-checkpoints", "1",
              "--memory-plan", "16gb")
    straight = _run_cli(_args(setup, tmp_path / "straight", *common, steps=10))
    killed_dir = tmp_path / "killed"
    victim = _run_cli(_args(setup, killed_dir, *common, steps=10))
    deadline = time.time() + 600
    while time.time() < deadline:  # kill as soon as the 4th step is checkpointed, mid-run
        if (killed_dir / "checkpoints" / "checkpoint-0000004" / "state.json").exists():
            break
        assert victim.poll() is None, victim.stdout.read()
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed_dir / flux.LORA_FILE).exists()
    resumed = _run_cli(_args(setup, killed_dir, *common, "--resume", steps=10))
    assert resumed.wait(600) == 0, resumed.stdout.read()
    assert straight.wait(600) == 0, straight.stdout.read()
    a = lora.load_lora_file(tmp_path / "straight" / flux.LORA_FILE)
    b = lora.load_lora_file(killed_dir / flux.LORA_FILE)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if ".lora_B." in k)  # it did train
    history = json.loads((killed_dir / "summary.json").read_text())
    assert history["steps"] == 10 and history["memory_plan"] == "16gb"


def test_bad_inputs_fail_before_training(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.jsonl").write_text("")
    assert cli.main(["flux", "--model", setup["model"], "--data", str(empty), "--output", str(tmp_path / "o1")]) == 1
    assert "empty" in capsys.readouterr().err
    assert cli.main(["flux", "--model", str(tmp_path), "--data", setup["data"], "--output", str(tmp_path / "o2")]) == 1
    assert "not a diffusers FLUX folder" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert cli.main([]) == 2  # usage: no trainer named
    with pytest.raises(SystemExit) as usage:
        cli.main(["flux", "--model", setup["model"], "--data", setup["data"], "--output", "o3", "--memory-plan", "8gb"])
    assert usage.value.code == 2


def test_mismatched_pair_sizes_are_named(tmp_path):
    from erasekit.dataset_tools.triplets import TripletDataset, TripletWriter

    with TripletWriter(tmp_path / "d") as writer:
        image = np.zeros((64, 64, 3), np.uint8)
        writer.write("a", image, np.zeros((64, 64), bool), image, {"origin": {"kind": "image", "image": "a", "instance": 0}})
    target = tmp_path / "d" / "target" / "a.png"
    cv2.imwrite(str(target), np.zeros((64, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="48×64"):
        PairedCropDataset(TripletDataset(tmp_path / "d"), 32).validate()


def test_cli_lists_trainers_and_checks_the_transformer_class(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "flux" in capsys.readouterr().out
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="not a FluxTransformer2DModel"):
        flux.check_flux_folder(tmp_path)


def test_two_processes_under_torchrun_share_the_work(setup, tmp_path):
    """The distributed path (accelerate's DDP wrapping, gloo on CPU): two processes, one LoRA file."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "erasekit.train.cli",
               *_args(setup, tmp_path / "ddp", "--mixed-precision", "no", "--grad-accum", "2", "--checkpoint-every", "2",
                      steps=2)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "checkpoint-0000002" / "state.json").read_text())
    assert state["world"] == 2 and state["micro"] == 4
