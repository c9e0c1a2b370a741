"""LoRA adapters and LoRA files (safetensors) for any torch model.

Two ways to add a LoRA:

- ``inject_lora``: peft's layers replace the targets (the SD-inpainting trainer: UNet and text encoder);
- ``LoraSlots`` + ``attach``: one rank-r pair per *named* target, added to the output rows of whichever module
  computes that target, by forward hooks. This is how the OmniEraser trainer adapts diffusers' FLUX (one module per
  name) and ComfyUI's FLUX (q, k, v as row slices of one fused weight, ``img_in`` read 256 wide while its frozen
  weight is 64 wide) with the same parameters, the same initialisation and the same file.

Files hold peft/diffusers keys (``<module>.lora_A.weight`` / ``lora_B.weight``) under an optional prefix
such as ``transformer.``; that is the format diffusers' ``load_lora_weights`` and the OmniEraser release use.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


@dataclass
class LoraTarget:
    """Where one named LoRA acts: ``module``'s output rows ``rows = (start, size)`` (None: all), fed with inputs of
    ``in_features``; when ``base_in_features`` is smaller the module itself sees only the first ones (a widened
    input layer whose new columns are zero: the frozen weight is never padded)."""

    module: torch.nn.Module
    in_features: int
    out_features: int
    rows: tuple | None = None
    base_in_features: int | None = None


class LoraSlot(torch.nn.Module):
    """One LoRA pair: A ``[rank, in]`` uniform in ±1/√in (peft's ``kaiming_uniform_(a=√5)``), B ``[out, rank]`` zero."""

    def __init__(self, rank, in_features, out_features, generator):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = torch.nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank))

    def delta(self, x, scale):
        """``scale · B·A·x`` in ``x``'s compute dtype (autocast casts for itself)."""
        a, b = self.lora_A, self.lora_B
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        out = F.linear(F.linear(x, a), b)
        return out * scale if scale != 1.0 else out


class LoraSlots(torch.nn.Module):
    """Named LoRA slots (fp32) over ``targets`` ``{name: LoraTarget}``, initialised from ``seed`` in name order, so
    the same names and shapes give the same start on any model that computes them."""

    def __init__(self, targets, rank, alpha, seed=0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not targets:
            raise ValueError("no module of the model matched the LoRA targets")
        generator = torch.Generator().manual_seed(int(seed))
        self.names = sorted(targets)
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / float(rank)
        self.slots = torch.nn.ModuleList(
            LoraSlot(rank, targets[n].in_features, targets[n].rows[1] if targets[n].rows else targets[n].out_features,
                     generator) for n in self.names)
        self.targets = targets
        self._handles = []

    def named_slots(self):
        return zip(self.names, self.slots)

    def parameters_by_name(self):
        """``{"<target>.lora_A": Parameter, ...}``: what the optimiser trains and checkpoints hold."""
        return {f"{name}.{part}": getattr(slot, part) for name, slot in self.named_slots() for part in ("lora_A", "lora_B")}

    def state_dict_for_file(self, prefix=""):
        """peft/diffusers file keys (``<prefix><target>.lora_A.weight``), detached fp32 copies, scale not folded."""
        return {f"{prefix}{name}.{part}.weight": getattr(slot, part).detach().float().cpu().clone()
                for name, slot in self.named_slots() for part in ("lora_A", "lora_B")}

    def attach(self):
        """Hook every slot onto the module that computes its target (``detach`` removes the hooks)."""
        if self._handles:
            return self
        by_module = {}
        for name, slot in self.named_slots():
            target = self.targets[name]
            by_module.setdefault(id(target.module), (target.module, []))[1].append((target, slot))
        for module, parts in by_module.values():
            narrow_input = min((t.base_in_features for t, _ in parts if t.base_in_features), default=None)
            if narrow_input is not None:
                self._handles.append(module.register_forward_pre_hook(_narrow_input(narrow_input)))
            self._handles.append(module.register_forward_hook(_add_deltas(parts, self.scale, narrow_input is not None)))
        return self

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _narrow_input(narrow_to):
    """Pre-hook: remember the full input for the LoRA, hand the module only its first ``narrow_to`` features."""
    def hook(module, args):
        module.__dict__["_erasekit_lora_input"] = args[0]  # not Module.__setattr__: this runs every call
        if args[0].shape[-1] > narrow_to:
            return (args[0][..., :narrow_to],) + tuple(args[1:])
        return None
    return hook


def _add_deltas(parts, scale, narrowed):
    """Forward hook: add each slot's delta to its output rows."""
    whole = len(parts) == 1 and parts[0][0].rows is None

    def hook(module, args, output):
        x = module.__dict__.pop("_erasekit_lora_input") if narrowed else args[0]
        if whole:
            delta = parts[0][1].delta(x, scale)
            return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))
        for target, slot in parts:
            start, size = target.rows
            output.narrow(-1, start, size).add_(slot.delta(x, scale).to(output.dtype))
        return output
    return hook


def inject_lora(model: torch.nn.Module, target_modules, rank=32, alpha=32, init_lora_weights=True,
                adapter_name="default"):
    """Add a peft LoRA adapter to ``model`` in place (base weights frozen); returns its trainable parameters.

    Returns ``{parameter name: Parameter}`` of the LoRA only, in float32 so optimiser updates are not lost
    to bf16 rounding when the base model is in bf16.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(target_modules),
                        init_lora_weights=init_lora_weights)
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):  # diffusers models: also registers the config for load_lora_weights
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n}
    if not params:
        raise ValueError(f"no module of {type(model).__name__} matched the LoRA targets {list(target_modules)}")
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(model: torch.nn.Module, prefix="", dtype=None, adapter_name="default"):
    """The adapter's weights under file keys (``prefix + module + .lora_A.weight``), detached copies."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {f"{prefix}{k}": (v.detach().to(dtype) if dtype else v.detach()).contiguous().clone() for k, v in state.items()}


def load_lora_state_dict(model: torch.nn.Module, state, prefix="", adapter_name="default"):
    """Copy file weights into the model's adapter; every file key must land and every adapter weight be set."""
    from peft.utils import set_peft_model_state_dict

    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    foreign = sorted(k for k in state if not k.startswith(prefix))
    if foreign:
        raise ValueError(f"LoRA keys without the expected prefix {prefix!r}: {foreign[:5]}")
    expected = set(lora_state_dict(model, adapter_name=adapter_name))
    unexpected, missing = sorted(set(own) - expected), sorted(expected - set(own))
    if unexpected or missing:
        raise ValueError(f"LoRA file does not fit the model: unexpected keys {unexpected[:5]}, missing keys {missing[:5]}")
    set_peft_model_state_dict(model, own, adapter_name=adapter_name)
    return len(own)


def save_lora_file(path, state, metadata=None):
    """Write a LoRA state dict as safetensors atomically (temp file + rename); ``metadata`` values → str."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def load_lora_file(path):
    """State dict of a LoRA safetensors file (FileNotFoundError naming it when absent)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return load_file(os.fspath(path))
