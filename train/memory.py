"""What a FLUX LoRA run keeps in device memory, and the switches that make it fit a 16 or 24 GiB card.

- ``FrozenLinear``: a frozen ``nn.Linear`` whose weight is *stored* in fp8 (e4m3fn, one scale per tensor, like
  ComfyUI's scaled-fp8 files) or bf16, on the device or in (pinned) CPU memory, and *up-cast* per layer to the
  input's dtype on the input's device at each use, as ComfyUI's ``manual_cast`` / low-VRAM ops do. Its autograd
  function keeps no activation and no up-cast copy for backward (it up-casts again there), so the fp8 storage is
  the only copy of a frozen weight, with or without gradient checkpointing.
- ``MemoryPlan`` and ``PLANS``: the named configurations of the CLI's ``--memory-plan`` and the node's
  ``memory_plan`` input (base-weight storage, gradient checkpointing, a budget for offloading frozen blocks).
- ``estimate``: the memory model both trainers check before training. Weights and LoRA state are exact byte counts
  of the model in hand; activations use ``ACTIVATION_UNITS``, which ``saved_activation_units`` measures on CPU
  (tests/test_train_memory.py re-measures it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
GIB = 2 ** 30
FIT = 0.92  # share of a budget or a card an estimate may fill: the rest is the CUDA context and fragmentation
STORAGE_DTYPES = {"fp8": FP8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ frozen weights

def compute_dtype_for(x):
    """The dtype a layer computes in: autocast's where autocast is on for ``x``'s device, else ``x``'s own."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def upcast_fp8(stored, dtype):
    """e4m3fn → (tensor in ``dtype``, factor): the stored values are ``tensor × factor``. On CPU the work goes
    through fp16 bits, because torch's CPU cast from fp8 converts element by element (about 6× slower here): a
    code's 7 magnitude bits shifted left by 7 are an fp16 worth 2⁻⁸ of its value, subnormals included, exact for
    every finite code (tests/test_train_memory.py checks all 256); the 2⁸ is left to the matmul."""
    if stored.device.type != "cpu":
        return stored.to(dtype), 1.0
    half = stored.view(torch.uint8).to(torch.int16) << 7  # magnitude in bits 7-13, the sign in bit 14
    half += half & 0x4000  # the sign moves to bit 15 (a carry), bit 14 clears
    return half.view(torch.float16).to(dtype), 256.0


def scaled_linear(x, weight, factor, bias):
    """``x·(factor·W)ᵀ + b`` with the factor applied inside the matmul (no pass over the weight)."""
    if factor == 1.0:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, flat, weight.t(), alpha=factor) if bias is not None else \
        torch.mm(flat, weight.t()).mul_(factor)
    return out.view(*x.shape[:-1], weight.shape[0])


class _UpcastLinear(torch.autograd.Function):
    """``y = x·Wᵀ + b`` with W up-cast from its stored form in forward and again in backward (nothing saved)."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.input_dtype = layer, x.dtype
        weight, factor = layer.weight_and_factor(x.device, dtype)
        return scaled_linear(x.to(dtype), weight, factor, layer.bias_for(x.device, dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, factor = ctx.layer.weight_and_factor(grad.device, grad.dtype)
        grad_input = grad @ weight
        if factor != 1.0:
            grad_input = grad_input.mul_(factor)
        return grad_input.to(ctx.input_dtype), None, None


class FrozenLinear(torch.nn.Module):
    """A frozen linear layer with stored weights (see the module docstring). Not a parameter: optimisers, DDP and
    ``.to()`` leave it where the memory plan put it."""

    def __init__(self, linear: torch.nn.Linear, storage="bf16", device=None, offload=False):
        super().__init__()
        weight = linear.weight.detach()
        device = torch.device(device) if device is not None else weight.device
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.storage, self.scale = storage, None
        if storage == "fp8":
            # One scale per tensor (amax / 448): FLUX weights (|w| ~ 0.02) would otherwise sit in fp8's subnormals.
            self.scale = float(weight.abs().amax().float().clamp_min(1e-12)) / FP8_MAX
            stored = (weight.float() / self.scale).to(FP8)
        else:
            stored = weight.to(STORAGE_DTYPES[storage])
        where = torch.device("cpu") if offload else device
        stored = stored.to(where)
        if offload and device.type == "cuda":
            stored = stored.pin_memory()
        self.stored = stored  # a plain attribute: no state_dict / DDP broadcast / .to() moves it
        self.offloaded = bool(offload)
        self.bias = None if linear.bias is None else linear.bias.detach().to(device)

    @property
    def weight(self):
        return self.stored

    def weight_and_factor(self, device, dtype):
        """(tensor, factor): the weight on ``device`` is ``tensor × factor`` in ``dtype``, the tensor a fresh copy
        (the stored one is never changed)."""
        if self.scale is None:
            return self.stored.to(device, dtype, non_blocking=self.offloaded), 1.0
        weight, factor = upcast_fp8(self.stored.to(device, non_blocking=self.offloaded), dtype)
        return weight, factor * self.scale

    def weight_for(self, device, dtype):
        """The weight on ``device`` in ``dtype``."""
        weight, factor = self.weight_and_factor(device, dtype)
        return weight.mul_(factor) if factor != 1.0 else weight

    def bias_for(self, device, dtype):
        bias = self.bias
        return bias if bias is None or (bias.dtype == dtype and bias.device == device) else bias.to(device, dtype)

    def forward(self, x):
        dtype = compute_dtype_for(x)
        if not (x.requires_grad and torch.is_grad_enabled()):  # nothing to differentiate: no autograd node
            weight, factor = self.weight_and_factor(x.device, dtype)
            return scaled_linear(x.to(dtype), weight, factor, self.bias_for(x.device, dtype))
        return _UpcastLinear.apply(x, self, dtype)

    def stored_bytes(self, on_device=True):
        """Bytes this layer keeps on its compute device (0 when offloaded) or, ``on_device=False``, in total."""
        size = self.stored.numel() * self.stored.element_size()
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return bias + (0 if on_device and self.offloaded else size)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage}"
                f"{', offloaded' if self.offloaded else ''}")


def freeze_linears(module, storage="bf16", device=None, offload=lambda name: False, skip=()):
    """Replace every ``nn.Linear`` under ``module`` by a ``FrozenLinear`` (one layer at a time, so the peak is one
    layer's copy); other parameters go to ``device``. ``offload(name)`` says which layers stay in CPU memory.
    Returns the number of layers replaced."""
    count = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, torch.nn.Linear) and full not in skip:
                setattr(child, attr, FrozenLinear(sub, storage, device, offload(full)))
                count += 1
    if device is not None:
        for param in module.parameters():
            param.data = param.data.to(device)
        for sub in module.modules():
            for key, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[key] = buffer.to(device)
    return count


# ------------------------------------------------------------------------------------------------ plans

@dataclass(frozen=True)
class MemoryPlan:
    """How a run fits: frozen-weight storage (``base``: fp8, bf16, or None = as loaded), gradient checkpointing,
    and ``budget_gib``: frozen blocks are offloaded to CPU memory until the estimate fits it (None: no offload)."""

    name: str
    base: str | None
    gradient_checkpointing: bool
    budget_gib: float | None
    help: str


PLANS = {
    "16gb": MemoryPlan("16gb", "fp8", True, 16.0,
                       "frozen FLUX weights stored in fp8 (e4m3fn, up-cast per layer), gradient checkpointing: "
                       "FLUX.1-dev LoRA at 1024 px in about 14.6 GiB (estimated from parameter counts and the "
                       "CPU-measured activation table; to be measured on a GPU)"),
    "24gb": MemoryPlan("24gb", "bf16", True, 24.0,
                       "frozen FLUX weights in bf16, gradient checkpointing, and as many frozen blocks kept in CPU "
                       "memory (streamed per layer) as it takes to stay under 24 GiB: at 1024 px about 22 GiB with "
                       "3.7 GiB of blocks in CPU memory (estimated; to be measured on a GPU)"),
    "full": MemoryPlan("full", None, False, None,
                       "weights as loaded, no checkpointing: the fastest; FLUX.1-dev in bf16 at 1024 px peaked at "
                       "50.6 GiB on an H200 (issue 17's first run; estimate 46 GiB)"),
}
PLAN_NAMES = ("auto",) + tuple(PLANS)


def plans_help():
    """One sentence per plan, for ``--help`` and the node tooltip."""
    return "; ".join(f"{plan.name}: {plan.help}" for plan in PLANS.values())


def resolve_plan(name, device, estimate_for=None):
    """``"auto"``: the fastest plan whose estimate fits ``device``'s total memory (``full`` on a CPU);
    otherwise the named plan. ``estimate_for(plan)`` → ``MemoryEstimate``."""
    if name != "auto":
        if name not in PLANS:
            raise ValueError(f"memory plan must be one of {PLAN_NAMES}, got {name!r}")
        return PLANS[name]
    device = torch.device(device)
    if device.type != "cuda" or estimate_for is None:
        return PLANS["full"]
    total = torch.cuda.get_device_properties(device).total_memory
    for plan in (PLANS["full"], PLANS["24gb"], PLANS["16gb"]):
        if estimate_for(plan).total <= FIT * total:
            return plan
    return PLANS["16gb"]


# ------------------------------------------------------------------------------------------------ the memory model

# Activations autograd saves per FLUX block, in units of tokens × hidden size × bytes per compute element: the
# slope over 96 → 288 tokens, measured on CPU in fp32 by ``saved_activation_units`` on a FLUX of hidden 128 with a
# LoRA slot on every official target (tests/test_train_memory.py and tests/comfy/test_train_flux_nodes.py measure it
# again, within 15 %). diffusers' FLUX and ComfyUI's FLUX (with the trainer's SDPA attention) save the same: double
# block 19.8, single block 12.3, outside the blocks 3.1. SDPA keeps log-sum-exp rows, never the score matrix, so the
# figure is per token. A checkpointed block keeps only its input stream (1 unit) and recomputes the rest in backward.
ACTIVATION_UNITS = {"double": 20.0, "single": 12.5, "outside": 3.0, "checkpointed": 1.0}


@dataclass
class MemoryEstimate:
    weights: int  # frozen weights kept on the device
    lora_state: int  # LoRA weights, gradients and AdamW's two moments, fp32
    activations: int
    workspace: int  # one block's recomputation (checkpointing) and the largest up-cast weight

    @property
    def total(self):
        return self.weights + self.lora_state + self.activations + self.workspace

    def describe(self):
        return (f"about {self.total / GIB:.1f} GiB (frozen weights {self.weights / GIB:.1f}, LoRA state "
                f"{self.lora_state / GIB:.2f}, activations {(self.activations + self.workspace) / GIB:.1f})")


def estimate(weight_bytes, lora_params, tokens, hidden, double_blocks, single_blocks, checkpointing,
             compute_bytes=2, largest_weight=0, batch=1, optimizer_states=2):
    """The memory model: exact weights and LoRA state, activations from ``ACTIVATION_UNITS``."""
    units = ACTIVATION_UNITS
    per_token = batch * tokens * hidden * compute_bytes
    if checkpointing:
        activations = per_token * (units["checkpointed"] * (double_blocks + single_blocks) + units["outside"])
        workspace = per_token * max(units["double"], units["single"])
    else:
        activations = per_token * (units["double"] * double_blocks + units["single"] * single_blocks
                                   + units["outside"])
        workspace = 0
    workspace += largest_weight * compute_bytes
    lora_state = lora_params * 4 * (2 + optimizer_states)
    return MemoryEstimate(int(weight_bytes), int(lora_state), int(activations), int(workspace))


def flux_tokens(resolution, text_tokens=512):
    """Sequence length of FLUX at ``resolution`` px: 2×2-packed latent tokens (1/16 of the side) + text tokens."""
    return math.ceil(resolution / 16) ** 2 + text_tokens


def saved_activation_units(run, tokens, hidden, model=None):
    """Bytes autograd saves while ``run()`` runs, in units of ``tokens × hidden × element size`` of the saved float
    tensors. Tensors sharing storage with ``model``'s weights (a frozen weight saved for backward costs nothing)
    and tensors saved twice are counted once or not at all."""
    weights = set()
    if model is not None:
        weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        weights |= {m.stored.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, FrozenLinear)}
    seen, total = set(), [0, 0]

    def pack(tensor):
        if tensor.is_floating_point() and tensor.untyped_storage().data_ptr() not in weights:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                total[0] += tensor.numel() * tensor.element_size()
                total[1] = tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total[0] / (tokens * hidden * max(1, total[1]))
