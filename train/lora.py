"""LoRA injection with peft, input-layer widening, and LoRA files (safetensors) for any torch model.

Files hold peft/diffusers keys (``<module>.lora_A.weight`` / ``lora_B.weight``) under an optional prefix
such as ``transformer.``; that is the format diffusers' ``load_lora_weights`` and the OmniEraser release use.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file


def widen_linear(linear: torch.nn.Linear, in_features: int) -> torch.nn.Linear:
    """A copy of ``linear`` taking ``in_features`` inputs: old columns kept, new ones zero (the old function)."""
    if in_features < linear.in_features:
        raise ValueError(f"cannot widen a Linear from {linear.in_features} down to {in_features} inputs")
    wide = torch.nn.Linear(in_features, linear.out_features, bias=linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :linear.in_features].copy_(linear.weight)
        if linear.bias is not None:
            wide.bias.copy_(linear.bias)
    wide.requires_grad_(linear.weight.requires_grad)
    return wide


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
