"""Erase Diffusion's chain-rectifying optimisation (CRO): "Erase Diffusion: Empowering Object Removal Through
Calibrating Diffusion Pathways" (CVPR 2025), the CRO training objective (no public code).

The clean image is blended with its object-pasted partner along the diffusion chain,
x̃ₜ = (1 − λₜ)·x₀^ori + λₜ·x₀^obj with λₜ = 1 − ᾱₜ, so the object fades out of the target as t falls.
One deterministic DDIM jump from xₜ to t − γ (γ ~ U{1..100}) is predicted from the model's ε and compared
with the mixed chain at t − γ. In a triplet dataset x₀^obj is the *source* and x₀^ori the *target*.
"""
import torch
import torch.nn.functional as F

from .epsilon import alpha_bar

MAX_JUMP = 100


def mix_weight(alphas_cumprod, timesteps, like):
    """λₜ = 1 − ᾱₜ: the object's weight in the mixed chain at ``timesteps`` (broadcast against ``like``)."""
    return 1.0 - alpha_bar(alphas_cumprod, timesteps, like)


def mixed_clean(x0_ori, x0_obj, alphas_cumprod, timesteps):
    """x̃ₜ = (1 − λₜ)·x₀^ori + λₜ·x₀^obj."""
    lam = mix_weight(alphas_cumprod, timesteps, x0_ori)
    return (1.0 - lam) * x0_ori.float() + lam * x0_obj.float()


def mixed_chain(x0_ori, x0_obj, noise, alphas_cumprod, timesteps):
    """xₜ^mix = √ᾱₜ·x̃ₜ + √(1 − ᾱₜ)·ε."""
    a = alpha_bar(alphas_cumprod, timesteps, x0_ori)
    return a.sqrt() * mixed_clean(x0_ori, x0_obj, alphas_cumprod, timesteps) + (1.0 - a).sqrt() * noise.float()


def ddim_jump(x_t, predicted_noise, alphas_cumprod, timesteps, prev_timesteps):
    """Deterministic DDIM (η = 0) step from t to an earlier t′ given the predicted ε.

    x̂₀ = (xₜ − √(1 − ᾱₜ)·ε̂) / √ᾱₜ, then x_{t′} = √ᾱ_{t′}·x̂₀ + √(1 − ᾱ_{t′})·ε̂.
    """
    a_t = alpha_bar(alphas_cumprod, timesteps, x_t)
    a_prev = alpha_bar(alphas_cumprod, prev_timesteps, x_t)
    eps = predicted_noise.float()
    x0_pred = (x_t.float() - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0_pred + (1.0 - a_prev).sqrt() * eps


def sample_cro_timesteps(batch_size, num_train_timesteps, max_jump=MAX_JUMP, generator=None, device=None):
    """(t, t − γ) per sample: t ~ U{1..T−1}, γ ~ U{1..max_jump}; t − γ is floored at 0.

    t = 0 is excluded because a jump from 0 has nowhere to go (the loss would carry no gradient).
    """
    if num_train_timesteps < 2:
        raise ValueError(f"CRO needs at least 2 training timesteps, got {num_train_timesteps}.")
    if max_jump < 1:
        raise ValueError(f"The CRO jump γ must allow at least 1 step, got max_jump={max_jump}.")
    timesteps = torch.randint(1, num_train_timesteps, (batch_size,), generator=generator, device=device)
    jumps = torch.randint(1, max_jump + 1, (batch_size,), generator=generator, device=device)
    return timesteps, (timesteps - jumps).clamp_min(0)


def cro_target(x0_ori, x0_obj, noise, alphas_cumprod, prev_timesteps):
    """x_{t−γ}^mix: the mixed chain at the jump's destination, with the same noise as xₜ."""
    return mixed_chain(x0_ori, x0_obj, noise, alphas_cumprod, prev_timesteps)


def cro_loss(predict_noise, x0_ori, x0_obj, noise, timesteps, prev_timesteps, alphas_cumprod):
    """‖x_{t−γ}^mix − DDIM(xₜ^mix, ε̂, t → t−γ)‖², averaged; ``predict_noise(x_t, t)`` wraps the model."""
    if x0_ori.shape != x0_obj.shape:
        raise ValueError(
            f"CRO needs the clean and object images at the same size, got {tuple(x0_ori.shape)} and {tuple(x0_obj.shape)}."
        )
    if bool((prev_timesteps >= timesteps).any()):
        raise ValueError("CRO jumps backwards in time: every t − γ must be smaller than its t.")
    x_t = mixed_chain(x0_ori, x0_obj, noise, alphas_cumprod, timesteps)
    predicted = predict_noise(x_t.to(x0_ori.dtype), timesteps)
    estimate = ddim_jump(x_t, predicted, alphas_cumprod, timesteps, prev_timesteps)
    return F.mse_loss(estimate, cro_target(x0_ori, x0_obj, noise, alphas_cumprod, prev_timesteps))
