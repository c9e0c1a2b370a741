"""The OmniEraser LoRA trainer (PRIS-CV/Omnieraser, train_control_lora_flux.py): one job, two model adapters.

``train_eraser(job, adapter, host)`` is the whole run, for ``erasekit-train flux`` (diffusers' FLUX,
``train.flux.DiffusersFlux``) and the ComfyUI node (ComfyUI's FLUX as the user loaded it, ``nodes/train_flux.py``).
What an adapter supplies is only what differs between the two implementations of FLUX (``FluxAdapter``): the
velocity for a packed input, which module computes each LoRA target, the VAE posterior, and how the memory plan
is put into effect. Everything else exists once, here:

- data: paired random crops of triplet folders (``open_training_data``; a streaming source can pass its own
  ``TrainingData``), a held-out part, optional fixed crop variants whose VAE moments are cached;
- the objective: latents drawn from the VAE posterior (mean + std·ε, as the official trainer's
  ``latent_dist.sample()``), the 48-channel condition, flow matching with target ``noise − latents``, FLUX guidance;
- the LoRA: ``train.lora.LoraSlots`` on the official targets, rank 32, alpha = rank, the official file layout;
- the loop (``train.loop``): accumulation, schedule, checkpoints and exact resume, the attention guard;
- the memory plan (``train.memory``): base-weight storage, gradient checkpointing, offload, the estimate.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..erasers import omnieraser as oe
from ..jobs import Host
from . import caching, flow_matching, lora, loop, memory
from .datasets import PairedCropDataset, collate, smarteraser_mask_augmenter
from .datasets import open_triplets as open_dataset

log = logging.getLogger(__name__)

CAPTION = oe.PROMPT
GUIDANCE = oe.GUIDANCE
TARGET_MODULES = oe.LORA_TARGETS
WIDEN_FACTOR = 4  # x_embedder reads 64 packed noise features + 192 packed condition features
PACKED_INPUT = 64 * WIDEN_FACTOR
LORA_FILE = "pytorch_lora_weights.safetensors"
LATENT_PARTS = ("target", "background", "foreground")
LEARNING_RATE = 3e-5  # the official run's base rate, scaled by batch × accumulation (--scale_lr)
HELDOUT_REPEATS = 4
# Held-out draws use seeds (seed, repeat, HELDOUT_STREAM); training micro-steps use (seed, micro, rank): a separate
# stream, fixed so a held-out loss is comparable across runs, trainers and loaders.
HELDOUT_STREAM = 99


# ------------------------------------------------------------------------------------------------ the job

@dataclass
class EraserJob:
    """The settings of one run; the CLI flags and the node inputs set the same fields with the same meaning.
    Defaults are the official recipe (batch 1 × accumulation 8, lr 3e-5 scaled, rank 32, 1024 px, guidance 3.5)."""

    steps: int = 1000
    rank: int = oe.LORA_RANK
    alpha: float | None = None  # None: alpha = rank (the official files carry no alpha)
    learning_rate: float = LEARNING_RATE
    scale_lr: bool = True
    batch_size: int = 1
    grad_accum: int = 8
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    optimizer: str = "adamw"
    mixed_precision: str = "auto"
    memory_plan: str | memory.MemoryPlan = "auto"
    resolution: int = 1024
    resize_short_side: int | None = None
    mask_augmentation: bool = True
    crop_variants: int = 0  # K > 0: K fixed crops per sample whose VAE moments are computed once
    guidance: float = GUIDANCE
    weighting_scheme: str = "none"
    shift: float = 1.0
    num_train_timesteps: int = 1000
    heldout: int = 1
    seed: int = 0
    output_dir: str | None = None  # loss_curve.png, logs/
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    validate_every: int = 0
    num_workers: int = 0
    cache_dir: str | None = None  # latent cache on disk (default: memory)

    @property
    def lora_alpha(self):
        return float(self.rank if self.alpha is None else self.alpha)

    def loop_config(self):
        return loop.LoopConfig(
            steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
            learning_rate=self.learning_rate, scale_lr=self.scale_lr, lr_scheduler=self.lr_scheduler,
            lr_warmup_steps=self.lr_warmup_steps, lr_num_cycles=self.lr_num_cycles, optimizer=self.optimizer,
            mixed_precision=self.mixed_precision, seed=self.seed, output_dir=self.output_dir,
            checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every,
            keep_checkpoints=self.keep_checkpoints, validate_every=self.validate_every,
            num_workers=self.num_workers).check()

    def objective(self):
        return {"guidance": self.guidance, "weighting_scheme": self.weighting_scheme, "shift": self.shift,
                "num_train_timesteps": self.num_train_timesteps}


# ------------------------------------------------------------------------------------------------ adapters

class FluxAdapter:
    """What one FLUX implementation supplies to the trainer. Subclasses: ``train.flux.DiffusersFlux`` and the
    ComfyUI node's ``ComfyFlux``. All tensors are on ``device``; images are ComfyUI IMAGEs ``[B,H,W,3]`` in [0, 1]."""

    device = torch.device("cpu")
    module: torch.nn.Module  # the transformer (registered in EraserModel: DDP, checkpointing)
    cache_tag = ""  # names the model in disk caches
    encode_ahead = False  # True: encode every cached crop before the first step (the VAE never runs between steps)

    def lora_targets(self) -> dict:
        """``{diffusers module name: train.lora.LoraTarget}`` for every official target."""
        raise NotImplementedError

    def velocity(self, noisy, condition, sigmas, guidance):
        """FLUX's velocity ``[B,16,h,w]`` (float32) for the noisy latent and the 48-channel condition."""
        raise NotImplementedError

    def vae_moments(self, images):
        """The VAE posterior of ``images``: (mean, std) of the raw latent, ``[B,16,h,w]`` each, no graph."""
        raise NotImplementedError

    def memory_facts(self) -> "MemoryFacts":
        raise NotImplementedError

    def apply_plan(self, plan, compute_dtype, offload=(), estimate=None):
        """Store the frozen weights as ``plan`` says, on the device (``offload``: Linear names kept in CPU memory;
        ``estimate``: the run's ``train.memory.MemoryEstimate``)."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled):
        loop.set_gradient_checkpointing(self.module, enabled)

    def training(self):
        """A context the training steps run in (e.g. the host's own attention back-end guard)."""
        return contextlib.nullcontext()

    def close(self):
        """Undo what ``apply_plan`` / ``training`` did to a model that others share."""


@dataclass
class MemoryFacts:
    """What the memory model needs to know of a FLUX: its Linear weights (name → (elements, bytes as loaded)) in
    offload order (last blocks first), other parameter bytes, width and depth."""

    linears: dict
    other_bytes: int
    hidden: int
    double_blocks: int
    single_blocks: int
    text_tokens: int
    offload_order: list = field(default_factory=list)  # [[Linear names of one block], ...]


def linear_facts(module, block_prefixes):
    """(Linear weights, other parameter bytes, offload order) of a FLUX ``module`` for ``MemoryFacts``: each
    ``nn.Linear`` (or ``train.memory.FrozenLinear``) by name → (elements, bytes as loaded); the bytes of every other
    parameter (biases, norms, embeddings); and the blocks' Linear names, one list per block, in offload order:
    the blocks of ``block_prefixes`` (the module's block lists, e.g. ``("single_blocks", "double_blocks")``) in
    that order, each list's last block first."""
    linears, linear_weights = {}, set()
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            linears[name] = (sub.weight.numel(), sub.weight.numel() * sub.weight.element_size())
            linear_weights.add(id(sub.weight))
        elif isinstance(sub, memory.FrozenLinear):
            linears[name] = (sub.stored.numel(), sub.stored_bytes(on_device=False))
    other = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in linear_weights)
    order = [[n for n in linears if n.startswith(f"{prefix}.{i}.")]
             for prefix in block_prefixes for i in reversed(range(len(getattr(module, prefix))))]
    return linears, other, order


def plan_memory(facts: MemoryFacts, plan: memory.MemoryPlan, lora_params, resolution, compute_bytes, batch=1,
                optimizer="adamw"):
    """(estimate, offloaded Linear names): the plan's estimate, offloading whole blocks until it fits the budget."""
    def layer_bytes(name):
        numel, loaded = facts.linears[name]
        return loaded if plan.base is None else numel * memory.STORAGE_DTYPES[plan.base].itemsize

    largest = max((numel for numel, _ in facts.linears.values()), default=0)
    tokens = memory.flux_tokens(resolution, facts.text_tokens)

    def estimate_with(offloaded):
        weights = facts.other_bytes + sum(layer_bytes(n) for n in facts.linears if n not in offloaded)
        return memory.estimate(weights, lora_params, tokens, facts.hidden, facts.double_blocks, facts.single_blocks,
                               plan.gradient_checkpointing, compute_bytes, largest, batch,
                               optimizer_states=1 if optimizer == "adamw8bit" else 2)

    offloaded = set()
    found = estimate_with(offloaded)
    if plan.budget_gib is not None:
        for block in facts.offload_order:
            if found.total <= memory.FIT * plan.budget_gib * memory.GIB:
                break
            offloaded.update(block)
            found = estimate_with(offloaded)
    return found, offloaded


def official_lora_targets(names):
    """The diffusers module names that the official target list selects (PEFT's suffix rule)."""
    return sorted(n for n in names if any(n == t or n.endswith("." + t) for t in TARGET_MODULES))


# ------------------------------------------------------------------------------------------------ objective

class EraserModel(torch.nn.Module):
    """The trained model as the loop sees it: the adapter's FLUX plus the LoRA slots; ``forward`` is the velocity.
    Under several processes the loop wraps this module in DDP, which then synchronises the slots' gradients."""

    def __init__(self, adapter: FluxAdapter, slots: lora.LoraSlots | None):
        super().__init__()
        self.adapter = adapter
        self.net = adapter.module
        self.lora = slots

    def forward(self, noisy, condition, sigmas, guidance):
        return self.adapter.velocity(noisy, condition, sigmas, guidance)

    def enable_gradient_checkpointing(self):
        self.adapter.set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self):
        self.adapter.set_gradient_checkpointing(False)


def encode_moments(adapter: FluxAdapter, source, mask, target):
    """VAE posterior moments of one pixel batch: ``{target_mean, target_std, background_…, foreground_…}``."""
    background, foreground = oe.condition_images(source, mask)
    pixels = {"target": target, "background": background, "foreground": foreground}
    out = {}
    with torch.no_grad():
        for part in LATENT_PARTS:
            mean, std = adapter.vae_moments(pixels[part].to(adapter.device, torch.float32))
            out[f"{part}_mean"], out[f"{part}_std"] = mean.float(), std.float()
    return out


def sample_latents(moments, generator):
    """One posterior draw per part (target, background, foreground, in that order), normalised for FLUX."""
    return {part: oe.normalize_flux_latent(caching.sample_latent(moments[f"{part}_mean"], moments[f"{part}_std"],
                                                                 generator)) for part in LATENT_PARTS}


def eraser_loss(model, moments, mask, generator, guidance=GUIDANCE, weighting_scheme="none",
                num_train_timesteps=1000, shift=1.0):
    """One micro-batch of the OmniEraser objective; ``model`` is an ``EraserModel`` (or its DDP wrapper)."""
    device = generator.device
    latents = sample_latents(moments, generator)
    condition = oe.condition_latent(latents["background"], latents["foreground"], mask.to(device))
    target = latents["target"]
    noise = torch.randn(target.shape, generator=generator, device=device)
    sigmas = flow_matching.sample_sigmas(target.shape[0], generator, device, num_train_timesteps, shift,
                                         weighting_scheme)
    noisy = flow_matching.noisy_latents(target, noise, sigmas)
    prediction = model(noisy, condition, sigmas, guidance)
    return flow_matching.flow_matching_loss(prediction, target, noise, sigmas, weighting_scheme)


def heldout_loss(model, moments, mask, seed=0, repeats=HELDOUT_REPEATS, mixed_precision="no", **objective):
    """Mean eraser loss over ``repeats`` fixed draws (posterior samples, noise, σ) on a held-out batch, no grad:
    the same number from the trainer and from any model that loads the LoRA. ``mask`` is on the model's device."""
    device = mask.device
    losses = []
    with torch.no_grad(), loop.training_attention(), loop.autocast_for(mixed_precision, device):
        for r in range(repeats):
            generator = torch.Generator(device).manual_seed(loop.derive_seed(seed, r, HELDOUT_STREAM))
            losses.append(float(eraser_loss(model, moments, mask, generator, **objective)))
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------------------ LoRA file

def lora_metadata(rank, targets=TARGET_MODULES, extra=None):
    """diffusers' safetensors metadata so ``load_lora_weights`` rebuilds the config (alpha = rank, see below)."""
    config = {"transformer.r": int(rank), "transformer.lora_alpha": int(rank),
              "transformer.target_modules": list(targets)}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True), **(extra or {})}


def official_lora_state(state, rank, alpha, dtype=torch.bfloat16):
    """File tensors with the alpha/rank scale folded into ``lora_B``: the official files carry no alpha
    (loaders assume alpha = rank), so any alpha trains and loads the same everywhere."""
    scale = float(alpha) / float(rank)
    out = {k: (v.float() * scale if ".lora_B." in k and scale != 1.0 else v.float()).to(dtype).contiguous()
           for k, v in state.items()}
    widened = out["transformer.x_embedder.lora_A.weight"].shape
    if widened[1] != PACKED_INPUT:
        raise ValueError(f"x_embedder lora_A is {tuple(widened)}; the OmniEraser layout needs [rank, {PACKED_INPUT}]")
    return out


def save_lora(path, state, rank, extra=None):
    """Write an OmniEraser LoRA state (official layout + diffusers metadata) atomically; returns the path."""
    return lora.save_lora_file(path, state, lora_metadata(rank, extra=extra))


# ------------------------------------------------------------------------------------------------ data

@dataclass
class TrainingData:
    """The training crops (keyed by ``(index, draw)``, see ``train.datasets``) and the held-out crops. The folder
    reader makes one (``open_training_data``); another source (e.g. streamed shards) may build its own."""

    train: PairedCropDataset
    heldout: PairedCropDataset


def open_triplets(folders):
    """One indexable over several datasets: triplet folders or WebDataset shards (``train.datasets.open_triplets``)."""
    parts = [open_dataset(f) for f in folders]
    if len(parts) == 1:
        return parts[0]
    return torch.utils.data.ConcatDataset(parts)


def split_heldout(triplets, count):
    """(training part, held-out part): the last ``count`` samples are held out when at least one sample is
    left to train on; a dataset that small is evaluated on its own training samples (logged)."""
    count = max(1, int(count))
    if len(triplets) > count:
        n = len(triplets) - count
        return torch.utils.data.Subset(triplets, range(n)), torch.utils.data.Subset(triplets, range(n, len(triplets)))
    if len(triplets) == 0:
        raise ValueError("the training dataset is empty: it holds no (source, mask, target) samples")
    log.warning("only %d samples: the held-out loss is measured on training samples", len(triplets))
    return triplets, triplets


def open_training_data(folders, job: EraserJob) -> TrainingData:
    """Paired crops of triplet folders; every pair is read once and checked before any model work."""
    triplets = open_triplets(folders)
    train_part, heldout_part = split_heldout(triplets, job.heldout)
    augment = smarteraser_mask_augmenter if job.mask_augmentation else None
    data = TrainingData(
        PairedCropDataset(train_part, job.resolution, seed=job.seed, augment_mask=augment,
                          resize_short_side=job.resize_short_side, variants=job.crop_variants or None),
        PairedCropDataset(heldout_part, job.resolution, seed=job.seed + 1, resize_short_side=job.resize_short_side))
    data.train.validate()
    data.heldout.validate()
    return data


def heldout_batch(dataset, draw=0):
    """Every sample of a (small) held-out ``PairedCropDataset`` as one fixed batch."""
    return collate([dataset[(i, draw)] for i in range(len(dataset))])


class CachedKeys(torch.utils.data.Dataset):
    """Only the keys of a ``PairedCropDataset`` with fixed variants: with a latent cache a step needs no pixels."""

    def __init__(self, samples):
        if not samples.variants:
            raise ValueError("caching latents needs a dataset with fixed variants (PairedCropDataset(variants=K))")
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def rank_items(self, rank, world):
        return self.samples.rank_items(rank, world)

    def __getitem__(self, key):
        index, draw = self.samples.key(*key)
        return {"key": f"{index}:{draw}", "item": (index, draw)}


def collate_keys(rows):
    return {"key": [r["key"] for r in rows], "item": [r["item"] for r in rows]}


class Moments:
    """Pixel batches or key batches → (VAE moments, pixel mask) on the device, through the cache when there is one."""

    def __init__(self, adapter, samples, cache=None):
        self.adapter, self.samples, self.cache = adapter, samples, cache

    def encode_item(self, item):
        one = collate([self.samples[item]])
        return {**encode_moments(self.adapter, one["source"], one["mask"], one["target"]),
                "mask": one["mask"].to(self.adapter.device)}

    def __call__(self, batch):
        if "source" in batch:
            device = self.adapter.device
            return encode_moments(self.adapter, batch["source"], batch["mask"], batch["target"]), batch["mask"].to(device)
        rows = [self.cache.get(key, lambda item=item: self.encode_item(item))
                for key, item in zip(batch["key"], batch["item"])]
        moments = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if len(rows) > 1 else dict(rows[0])
        return moments, moments.pop("mask")


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class EraserResult:
    step: int
    history: list
    heldout_loss: float | None
    lora_state: dict | None  # official file tensors (fp32), on the main process
    interrupted: bool = False
    checkpoint: str | None = None
    plan: str = ""
    estimate: memory.MemoryEstimate | None = None
    seconds: float = 0.0


def choose_plan(job: EraserJob, adapter: FluxAdapter, lora_params, compute_bytes):
    """The memory plan of the run (``auto`` picks the fastest that fits the device), its estimate and offload set."""
    facts = adapter.memory_facts()
    planned = {}  # id(plan) → (estimate, offloaded): each plan is estimated once

    def plan_for(plan):
        if id(plan) not in planned:
            planned[id(plan)] = plan_memory(facts, plan, lora_params, job.resolution, compute_bytes, job.batch_size,
                                            job.optimizer)
        return planned[id(plan)]

    plan = job.memory_plan if isinstance(job.memory_plan, memory.MemoryPlan) else \
        memory.resolve_plan(job.memory_plan, adapter.device, lambda candidate: plan_for(candidate)[0])
    estimate, offloaded = plan_for(plan)
    return plan, estimate, offloaded


@dataclass
class RunPlan:
    """What a run will hold in memory, decided before any weight moves."""

    plan: memory.MemoryPlan
    estimate: memory.MemoryEstimate
    offloaded: set
    precision: str  # the loop's resolved mixed precision ("bf16", "fp16", "no")


def plan_run(job: EraserJob, adapter: FluxAdapter, check_memory=None) -> RunPlan:
    """Resolve the mixed precision and the memory plan; ``check_memory(estimate, plan)`` may refuse the run."""
    precision = loop.resolve_mixed_precision(job.mixed_precision, adapter.device)
    compute_dtype = loop.COMPUTE_DTYPES[precision]
    # counted, not kept: the plan may replace these modules, and a reference would keep their weights alive
    lora_params = sum(job.rank * (t.in_features + (t.rows[1] if t.rows else t.out_features))
                      for t in adapter.lora_targets().values())
    plan, estimate, offloaded = choose_plan(job, adapter, lora_params, torch.finfo(compute_dtype).bits // 8)
    log.info("memory plan %s: %s%s", plan.name, estimate.describe(),
             f", {len(offloaded)} frozen layers in CPU memory" if offloaded else "")
    if check_memory is not None:
        check_memory(estimate, plan)
    return RunPlan(plan, estimate, offloaded, precision)


def build_model(job: EraserJob, adapter: FluxAdapter, run: RunPlan):
    """Put the plan into effect and add the LoRA: returns (slots, ``EraserModel``), ready for ``loop.train``."""
    adapter.apply_plan(run.plan, loop.COMPUTE_DTYPES[run.precision], run.offloaded, run.estimate)
    adapter.module.requires_grad_(False)  # only the LoRA slots train
    targets = adapter.lora_targets()  # the plan may have replaced the modules that compute them
    slots = lora.LoraSlots(targets, job.rank, job.lora_alpha, job.seed).to(adapter.device).attach()
    return slots, EraserModel(adapter, slots)


def train_eraser(job: EraserJob, adapter: FluxAdapter, host: Host | None = None, data: TrainingData | None = None,
                 folders=None, accelerator=None, validate=None, partial_lora=None, check_memory=None,
                 save_dtype=torch.float32) -> EraserResult:
    """Train an OmniEraser LoRA on ``adapter``'s FLUX; see the module docstring.

    ``data`` or ``folders`` (triplet dataset folders) give the crops. ``host`` reports progress, takes Cancel and
    logs. ``validate(step, model)`` → ``{"scalars": …, "images": …}`` every ``job.validate_every`` steps.
    ``partial_lora(step, state)`` is called with the LoRA reached when a run is interrupted. ``check_memory(estimate,
    plan)`` may refuse a run before any weight moves (raise ValueError). Returns an ``EraserResult``.
    """
    host = host or Host()
    data = data or open_training_data(folders, job)
    accelerator = accelerator or loop.SingleProcess(adapter.device)
    device = adapter.device
    config = job.loop_config()
    run = plan_run(job, adapter, check_memory)
    plan, estimate, precision = run.plan, run.estimate, run.precision
    config.mixed_precision = precision
    config.gradient_checkpointing = plan.gradient_checkpointing

    cache = None
    if job.crop_variants:
        cache = caching.LatentCache(f"{job.cache_dir}/latents" if job.cache_dir else None,
                                    tag=f"{adapter.cache_tag}|{job.resolution}|{job.seed}", device=device)
    moments_of = Moments(adapter, data.train, cache)
    if cache is not None and adapter.encode_ahead:
        keys = [(i, v) for i in range(len(data.train)) for v in range(job.crop_variants)]
        for n, key in enumerate(keys):
            host.check_interrupt()
            cache.get(f"{key[0]}:{key[1]}", lambda key=key: moments_of.encode_item(key))
            host.progress(n + 1, len(keys), "crops")
    held = heldout_batch(data.heldout)
    held_moments = encode_moments(adapter, held["source"], held["mask"], held["target"])
    held_mask = held["mask"].to(device)

    slots, model = build_model(job, adapter, run)
    params = slots.parameters_by_name()
    objective = job.objective()
    progress_state = {"step": 0}

    def step_fn(trained, batch, generator):
        moments, mask = moments_of(batch)
        return eraser_loss(trained, moments, mask, generator, **objective)

    def progress(step, total, loss):
        progress_state["step"] = step
        host.progress(step, total, "steps")
        if step == total or step % 10 == 0:
            host.log(f"step {step}/{total} loss {loss:.5f}")

    def check_interrupt():
        host.check_interrupt()
        return False

    def run_validation(step):
        report = {"scalars": {"heldout_loss": heldout_loss(model, held_moments, held_mask, job.seed,
                                                           mixed_precision=precision, **objective)}}
        if validate is not None:
            extra = validate(step, model) or {}
            report["scalars"].update(extra.get("scalars", {}))
            report["images"] = extra.get("images", {})
        host.log(f"step {step}: held-out loss {report['scalars']['heldout_loss']:.5f}")
        return report

    stream, collate_fn = (CachedKeys(data.train), collate_keys) if cache is not None else (data.train, collate)
    try:
        with adapter.training():
            result = loop.train(step_fn, params, stream, config, model=model, accelerator=accelerator,
                                collate_fn=collate_fn, resume=job.resume, progress=progress,
                                check_interrupt=check_interrupt, validate=run_validation, device=device)
            final = None
            state = None
            if accelerator.is_main_process:
                final = heldout_loss(model, held_moments, held_mask, job.seed, mixed_precision=precision, **objective)
                state = official_lora_state(slots.state_dict_for_file("transformer."), job.rank, job.lora_alpha,
                                            save_dtype)
    except BaseException:
        if partial_lora is not None and progress_state["step"] and accelerator.is_main_process:
            partial_lora(progress_state["step"], official_lora_state(
                slots.state_dict_for_file("transformer."), job.rank, job.lora_alpha, torch.bfloat16))
        raise
    finally:
        slots.detach()
        adapter.close()
    return EraserResult(step=result.step, history=result.history, heldout_loss=final, lora_state=state,
                        interrupted=result.interrupted, checkpoint=result.checkpoint, plan=plan.name,
                        estimate=estimate, seconds=result.seconds)
