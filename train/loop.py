"""A small, model-agnostic training loop with exact resume, on HF ``accelerate``.

The caller supplies what is model specific:

- ``step_fn(model, batch, generator) → loss`` (a scalar tensor): one micro-batch forward pass. ``batch`` is
  what the data loader yields; ``generator`` is a ``torch.Generator`` on the training device seeded from
  (seed, micro-step, process), the only randomness a step may use (noise, timesteps) so a resumed run
  draws exactly what the uninterrupted run drew.
- ``params``: ``{name: Parameter}``, the trainable parameters (e.g. ``train.lora.inject_lora``'s result).
- ``dataset``: indexable by the keys ``(index, draw)`` (see ``train.datasets.PairedCropDataset``). The data
  order is a reproducible permutation per epoch; the position in it is part of the training state. A dataset
  with ``rank_items(rank, world)`` (WebDataset shards) gives each process its own samples to permute.

What the loop owns: AdamW (fused on CUDA, or bitsandbytes' 8-bit AdamW), diffusers' LR schedules, gradient
accumulation, bf16 autocast (or fp16 with a gradient scaler), gradient clipping, an attention back-end whose
backward works on every CUDA GPU (``training_attention``), checkpoints every N optimizer steps (atomic: a temp folder renamed into
place), ``resume`` (trainable weights, optimizer, scheduler, RNG states, data position, loss history),
validation at intervals, TensorBoard scalars and a loss-curve PNG. Under ``accelerate launch`` with several
processes the ``model`` is wrapped by ``accelerator.prepare`` (DDP) and each process takes its own share
of every global batch.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import curves

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZERS = ("adamw", "adamw8bit")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
MIXED_PRECISION_HELP = ("bf16 autocast, fp16 autocast with a gradient scaler (GPUs without bf16), or no (fp32). auto "
                        "(default): bf16 where the device runs it natively (CUDA GPUs with bf16, CPUs with AVX-512-BF16 "
                        "or AMX), fp32 elsewhere: emulated bf16 on a CPU is many times slower than fp32")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


@contextlib.contextmanager
def training_attention():
    """SDPA back-ends whose backward works, for the duration of a training step; the previous setting is restored.

    torch 2.11 + cuDNN attention backward on Hopper (H100/H200) fails with an illegal memory access /
    "mha_graph.execute(...).is_good()" (issue 17): cuDNN SDPA stays off during training steps. Remove when fixed.
    """
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def native_bf16(device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # oneDNN has bf16 kernels only for AVX-512-BF16 and AMX; elsewhere (e.g. AMD EPYC without AVX-512) a bf16
        # matmul is ~100-170x slower than fp32. Honour an ISA cap set for oneDNN or ATen as well.
        capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
        if capped and "BF16" not in capped and "AMX" not in capped and capped != "ALL":
            return False
        return (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    return device.type in ("mps", "xpu")


def resolve_mixed_precision(value, device) -> str:
    """``"auto"`` → ``"bf16"`` where ``device`` runs bf16 natively, else ``"no"``; other values unchanged."""
    if value == "auto":
        return "bf16" if native_bf16(device) else "no"
    return value


def autocast_for(mixed_precision, device):
    """The autocast context of a resolved ``mixed_precision`` on ``device`` (a no-op for "no")."""
    device = torch.device(device)
    dtype = COMPUTE_DTYPES[resolve_mixed_precision(mixed_precision, device)]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class LoopConfig:
    """Hyper-parameters of a run. ``steps`` counts optimizer steps (each = ``grad_accum`` micro-batches)."""

    steps: int
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-4
    scale_lr: bool = False  # lr × grad_accum × batch_size × processes, like diffusers' --scale_lr
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # "bf16"/"fp16" autocast, "no" (fp32), or "auto": bf16 where the device runs it natively
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str | None = None  # loss_curve.png and TensorBoard logs (logs/)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    validate_every: int = 0
    num_workers: int = 0

    def check(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"steps, batch_size and grad_accum must be >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.grad_accum}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        return self


def add_loop_arguments(parser, *, batch_size, grad_accum, lr_scheduler, scale_lr, gradient_checkpointing=True):
    """The command-line options every trainer shares (the loop's, not the model's), with the recipe's defaults.

    ``scale_lr`` is the recipe's default: True adds ``--no-scale-lr``, False adds ``--scale-lr``; either way
    the value lands in ``args.scale_lr``. ``gradient_checkpointing=False`` leaves the switch to the trainer's own
    options (e.g. a memory plan)."""
    if scale_lr:
        parser.add_argument("--no-scale-lr", dest="scale_lr", action="store_false",
                            help="do not multiply lr by batch × accumulation × GPUs")
    else:
        parser.add_argument("--scale-lr", action="store_true", help="multiply lr by batch × accumulation × GPUs")
    parser.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=lr_scheduler)
    parser.add_argument("--lr-warmup-steps", type=int, default=0)
    parser.add_argument("--lr-num-cycles", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--grad-accum", type=int, default=grad_accum)
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto", help=MIXED_PRECISION_HELP)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="adamw8bit needs bitsandbytes + CUDA")
    if gradient_checkpointing:
        parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)


def loop_config_from_args(args, **extra):
    """``LoopConfig`` from the options of :func:`add_loop_arguments` plus ``--steps``, ``--lr``, ``--output``."""
    return LoopConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
        scale_lr=args.scale_lr, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        lr_num_cycles=args.lr_num_cycles, optimizer=args.optimizer, mixed_precision=args.mixed_precision,
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False), seed=args.seed, output_dir=args.output,
        checkpoint_dir=os.path.join(args.output, "checkpoints"), checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, num_workers=args.num_workers, **extra)


@dataclass
class TrainResult:
    step: int
    history: list = field(default_factory=list)
    interrupted: bool = False
    checkpoint: str | None = None
    seconds: float = 0.0


def derive_seed(*parts):
    """A 63-bit seed from integers (stable across runs and platforms)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


class KeyBatches(torch.utils.data.Sampler):
    """Endless micro-batches of dataset keys ``(index, draw)`` from global ``position`` on.

    Global position p → epoch p // n, item ``perm_epoch[p % n]``, draw p. Process ``rank`` of ``world``
    takes micro-batch m's positions ((m·world + rank)·batch … +batch).

    ``items``: the indices this process may draw (a sharded dataset gives each process its own shards, see
    ``train.datasets.rank_items``). It then walks its own permutation of them: position p of this process →
    epoch p // len(items), item ``items[perm_epoch[p % len(items)]]``, draw p·world + rank (no two processes
    draw the same key).
    """

    def __init__(self, num_items, seed, batch_size, start_micro=0, rank=0, world=1, items=None):
        self.items = None if items is None else list(items)
        if self.items is not None and not self.items:
            raise ValueError(f"process {rank} of {world} has no samples to train on")
        self.num_items = num_items if self.items is None else len(self.items)
        self.seed, self.batch_size = seed, batch_size
        self.start_micro, self.rank, self.world = start_micro, rank, world
        self._epoch, self._perm = None, None

    def _item(self, position):
        epoch = position // self.num_items
        if epoch != self._epoch:
            parts = (self.seed, epoch, 1) if self.items is None else (self.seed, epoch, 1, self.rank)
            generator = torch.Generator().manual_seed(derive_seed(*parts))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=generator).tolist()
        index = self._perm[position % self.num_items]
        return index if self.items is None else self.items[index]

    def batch_keys(self, micro):
        if self.items is not None:
            first = micro * self.batch_size
            return [(self._item(p), p * self.world + self.rank) for p in range(first, first + self.batch_size)]
        first = (micro * self.world + self.rank) * self.batch_size
        return [(self._item(p), p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        micro = self.start_micro
        while True:
            yield self.batch_keys(micro)
            micro += 1


def make_optimizer(params, config: LoopConfig, learning_rate):
    """AdamW over ``params`` (fused kernels on CUDA: one launch per step instead of one per tensor); ``adamw8bit``
    (8-bit moments) needs bitsandbytes and a CUDA device (clear error otherwise)."""
    kwargs = dict(lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.weight_decay, eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError("8-bit Adam needs the bitsandbytes package (pip install bitsandbytes); "
                             "use optimizer 'adamw' instead") from error
        if not all(p.is_cuda for p in params):
            raise ValueError("8-bit Adam (bitsandbytes) needs the trainable parameters on a CUDA GPU; "
                             "use optimizer 'adamw' on CPU")
        return bnb.optim.AdamW8bit(params, **kwargs)
    if params and all(p.is_cuda for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def lr_factor(name, step, total, warmup=0, cycles=1):
    """The learning-rate multiplier at optimizer step ``step`` (diffusers' ``get_scheduler`` formulas)."""
    if step < warmup:
        return step / max(1, warmup)
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def make_scheduler(optimizer, config: LoopConfig):
    """A LambdaLR following ``config.lr_scheduler`` (warm-up, then constant / linear / cosine / restarts)."""
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {config.lr_scheduler!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, config.lr_scheduler, total=config.steps, warmup=config.lr_warmup_steps,
        cycles=config.lr_num_cycles))


def set_gradient_checkpointing(model, enabled):
    """Turn activation checkpointing on/off: the model's own switch (diffusers) or checkpointed children."""
    if model is None:
        return
    if hasattr(model, "enable_gradient_checkpointing"):
        (model.enable_gradient_checkpointing if enabled else model.disable_gradient_checkpointing)()
        return
    for module in _blocks(model):
        if enabled and not hasattr(module, "_erasekit_forward"):
            module._erasekit_forward = module.forward
            module.forward = _checkpointed(module._erasekit_forward)
        elif not enabled and hasattr(module, "_erasekit_forward"):
            module.forward = module._erasekit_forward
            del module._erasekit_forward


def _blocks(model):
    """The outermost submodules that compute something (containers are looked through)."""
    for module in model.children():
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)):
            yield from _blocks(module)
        else:
            yield module


def _checkpointed(forward):
    def fresh_inputs(*args, **kwargs):
        # Blocks that update their inputs in place (ComfyUI's FLUX: ``txt += ...``) would corrupt the inputs
        # the checkpoint saved for recomputation; they get copies instead.
        args = [a.clone() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.clone() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(fresh_inputs, *args, use_reentrant=False, **kwargs)
    return run


# ---------------------------------------------------------------------------------------------- checkpoints

def list_checkpoints(folder):
    """Complete checkpoints in ``folder`` as [(step, path)], oldest first."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(folder, name, "state.json")):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def _rng_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, step, params, optimizer, scheduler, state, keep=2, scaler=None):
    """Write ``folder/checkpoint-<step>`` atomically and keep the newest ``keep``; returns its path."""
    final = os.path.join(folder, f"checkpoint-{step:07d}")
    if os.path.isfile(os.path.join(final, "state.json")):
        return final
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-checkpoint-{step:07d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, os.path.join(tmp, "optimizer.pt"))
    torch.save(_rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as handle:  # written last: marks the folder complete
        json.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, params, optimizer, scheduler, device=None, scaler=None):
    """Restore a checkpoint into live objects; returns its state dict (step, micro, history, …)."""
    with open(os.path.join(path, "state.json")) as handle:
        state = json.load(handle)
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the trainable parameters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    optim = torch.load(os.path.join(path, "optimizer.pt"), map_location=device or "cpu", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    if scaler is not None and optim.get("scaler"):
        scaler.load_state_dict(optim["scaler"])
    _set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True))
    return state


# ---------------------------------------------------------------------------------------------- the loop

class SingleProcess:
    """The few ``accelerate.Accelerator`` members the loop uses, for one process on ``device`` (e.g. inside
    ComfyUI, which manages devices itself). Not a distributed engine: several processes need accelerate."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def default_accelerator():
    """accelerate's Accelerator where accelerate is installed, else ``SingleProcess`` on the best device."""
    try:
        from accelerate import Accelerator
    except ImportError:
        return SingleProcess("cuda" if torch.cuda.is_available() else "cpu")
    return Accelerator(device_placement=False)


def _resume_path(resume, checkpoint_dir):
    if not resume:
        return None
    if isinstance(resume, (str, os.PathLike)) and resume not in ("latest",):
        if not os.path.isfile(os.path.join(resume, "state.json")):
            raise FileNotFoundError(f"{resume} is not a complete checkpoint folder (no state.json)")
        return os.fspath(resume)
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def train(step_fn: Callable, params: dict, dataset, config: LoopConfig, *, model=None, accelerator=None,
          collate_fn=None, resume=False, progress=None, check_interrupt=None, validate=None,
          device=None) -> TrainResult:
    """Run (or continue) training; see the module docstring. Returns the final step and loss history.

    ``resume``: False, True/"latest" (newest checkpoint in ``config.checkpoint_dir``, fresh start if none)
    or a checkpoint folder. ``progress(step, total, loss)``; ``check_interrupt()`` raises to abort (a
    checkpoint of the last finished step is written first when checkpointing is on) or returns True to
    stop early with ``interrupted=True``. ``validate(step) → {"scalars": {...}, "images": {tag: HWC}}``
    runs on the main process every ``validate_every`` steps and at the end.
    """
    config.check()
    started = time.perf_counter()
    accelerator = accelerator or default_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    device = torch.device(device) if device is not None else accelerator.device
    trainable = list(params.values())
    if not trainable:
        raise ValueError("nothing to train: the trainable parameter set is empty")
    if world > 1:
        if model is None:
            raise ValueError("several processes need the model to wrap for gradient synchronisation")
        model = accelerator.prepare_model(model)
    set_gradient_checkpointing(accelerator.unwrap_model(model) if model is not None else None,
                               config.gradient_checkpointing)

    lr = config.learning_rate * (config.grad_accum * config.batch_size * world if config.scale_lr else 1)
    optimizer = make_optimizer(trainable, config, lr)
    scheduler = make_scheduler(optimizer, config)
    precision = resolve_mixed_precision(config.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    step, history = 0, []
    checkpoint = _resume_path(resume, config.checkpoint_dir)
    if checkpoint:
        state = load_checkpoint(checkpoint, params, optimizer, scheduler, device=device, scaler=scaler)
        shape = (state["batch_size"], state["grad_accum"], state["world"])
        if shape != (config.batch_size, config.grad_accum, world):
            raise ValueError(f"checkpoint {checkpoint} was made with batch_size, grad_accum, processes = {shape}; "
                             f"this run has {(config.batch_size, config.grad_accum, world)}: resuming would "
                             "skip or repeat samples")
        step, history = state["step"], [tuple(h) for h in state["history"]]
        log.info("resumed from %s at step %d", checkpoint, step)

    own = dataset.rank_items(rank, world) if hasattr(dataset, "rank_items") else None  # a sharded dataset
    sampler = KeyBatches(len(dataset), config.seed, config.batch_size, step * config.grad_accum, rank, world, own)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                         collate_fn=collate_fn)
    batches = iter(loader)
    tensorboard = None
    if accelerator.is_main_process and config.output_dir:
        tensorboard = curves.TensorBoardLog(os.path.join(config.output_dir, "logs"))

    def state_now():
        return {"step": step, "micro": step * config.grad_accum, "history": history, "world": world,
                "batch_size": config.batch_size, "grad_accum": config.grad_accum, "config": asdict(config)}

    def write_checkpoint():
        path = None
        if accelerator.is_main_process and config.checkpoint_dir:
            path = save_checkpoint(config.checkpoint_dir, step, params, optimizer, scheduler, state_now(),
                                   config.keep_checkpoints, scaler)
            if config.output_dir:
                curves.save_loss_curve(history, os.path.join(config.output_dir, "loss_curve.png"))
        accelerator.wait_for_everyone()
        return path

    def run_validation():
        if validate is None or not accelerator.is_main_process:
            return
        report = validate(step) or {}
        if tensorboard is not None:
            tensorboard.scalars(report.get("scalars", {}), step)
            for tag, image in report.get("images", {}).items():
                tensorboard.image(tag, image, step)

    interrupted = False
    last_checkpoint = None
    try:
        while step < config.steps:
            window = []
            for micro_in_window in range(config.grad_accum):
                if check_interrupt is not None and check_interrupt():
                    interrupted = True
                    break
                micro = step * config.grad_accum + micro_in_window
                batch = next(batches)
                generator = torch.Generator(device).manual_seed(derive_seed(config.seed, micro, rank))
                last = micro_in_window == config.grad_accum - 1
                sync = contextlib.nullcontext() if last or world == 1 else accelerator.no_sync(model)
                with sync, training_attention():
                    with autocast_for(precision, device):
                        loss = step_fn(model, batch, generator)
                    scaled = loss / config.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                window.append(loss.detach().float())
            if interrupted:
                optimizer.zero_grad(set_to_none=True)
                break
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = torch.stack(window).mean()
            if world > 1:
                loss_value = accelerator.reduce(loss_value.to(accelerator.device), "mean")
            loss_value = float(loss_value)
            history.append((step, loss_value))
            if tensorboard is not None:
                tensorboard.scalars({"loss": loss_value, "lr": scheduler.get_last_lr()[0]}, step)
            if progress is not None:
                progress(step, config.steps, loss_value)
            if config.validate_every and step % config.validate_every == 0:
                run_validation()
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                last_checkpoint = write_checkpoint()
    except BaseException:
        if config.checkpoint_dir and step > 0:
            write_checkpoint()  # the last finished step survives an abort; the partial window is redone
        if tensorboard is not None:
            tensorboard.close()
        raise
    if config.checkpoint_dir and (interrupted or not config.checkpoint_every or step % config.checkpoint_every):
        last_checkpoint = write_checkpoint() or last_checkpoint
    if not interrupted and config.validate_every and step % config.validate_every:
        run_validation()
    if accelerator.is_main_process and config.output_dir:
        curves.save_loss_curve(history, os.path.join(config.output_dir, "loss_curve.png"))
    if tensorboard is not None:
        tensorboard.close()
    return TrainResult(step=step, history=history, interrupted=interrupted, checkpoint=last_checkpoint,
                       seconds=time.perf_counter() - started)
