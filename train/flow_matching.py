"""Rectified-flow (flow-matching) objective as FLUX and OmniEraser train it (PRIS-CV/Omnieraser,
train_control_lora_flux.py; diffusers' training_utils for the σ densities and weightings).

x_σ = (1 − σ)·x₀ + σ·ε and the model predicts the velocity ε − x₀ (the official target ``noise − latents``).
σ follows diffusers' ``FlowMatchEulerDiscreteScheduler`` training grid: u ~ density(weighting_scheme),
index = ⌊u·T⌋, σ = (T − index)/T, optionally time-shifted like a scheduler with a static ``shift``.
"""
import math

import torch

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def sample_density(batch_size, weighting_scheme="none", generator=None, device=None, logit_mean=0.0,
                   logit_std=1.0, mode_scale=1.29):
    """u in [0, 1) per sample, as diffusers' ``compute_density_for_timestep_sampling``."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    if weighting_scheme == "logit_normal":
        u = torch.normal(logit_mean, logit_std, (batch_size,), generator=generator, device=device).sigmoid()
    elif weighting_scheme == "mode":
        u = torch.rand(batch_size, generator=generator, device=device)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
    return u.clamp(0.0, 1.0 - 1e-7)


def sample_sigmas(batch_size, generator=None, device=None, num_train_timesteps=1000, shift=1.0,
                  weighting_scheme="none", **density_kwargs):
    """Training σ per sample on the scheduler's grid {1/T, …, 1}."""
    u = sample_density(batch_size, weighting_scheme, generator, device, **density_kwargs)
    index = (u * num_train_timesteps).long()
    sigmas = (num_train_timesteps - index).float() / num_train_timesteps
    if shift != 1.0:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas


def _expand(sigmas, like):
    return sigmas.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(latents, noise, sigmas):
    """x_σ = (1 − σ)·x₀ + σ·ε."""
    s = _expand(sigmas, latents)
    return ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)


def velocity_target(latents, noise):
    """The official target: ``noise − latents``."""
    return noise.float() - latents.float()


def loss_weighting(sigmas, weighting_scheme="none"):
    """Per-sample loss weight, as diffusers' ``compute_loss_weighting_for_sd3``."""
    if weighting_scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def flow_matching_loss(prediction, latents, noise, sigmas, weighting_scheme="none"):
    """Mean over the batch of each sample's weighted mean squared velocity error."""
    error = (prediction.float() - velocity_target(latents, noise)) ** 2
    weight = _expand(loss_weighting(sigmas, weighting_scheme), error)
    return (weight * error).reshape(error.shape[0], -1).mean(1).mean()
