"""Epsilon-prediction objective for DDPM-trained latent diffusion models (SD1.5 / SD2 inpainting).

Pure tensor functions: the caller supplies ``alphas_cumprod`` (ᾱ for every training timestep, e.g. a
diffusers ``DDPMScheduler.alphas_cumprod``) and a ``predict_noise(x_t, t)`` callable that wraps the model
with whatever conditioning it needs.
"""
import torch
import torch.nn.functional as F


def scaled_linear_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """ᾱ of Stable Diffusion's ``scaled_linear`` schedule (the SD1.5 / SD2 training schedule)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def alpha_bar(alphas_cumprod, timesteps, like):
    """ᾱ at per-sample ``timesteps``, shaped to broadcast against the batch tensor ``like``."""
    values = alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.to(like.device).long()]
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0, noise, alphas_cumprod, timesteps):
    """Forward diffusion: x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε."""
    a = alpha_bar(alphas_cumprod, timesteps, x0)
    return a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise.float()


def sample_timesteps(batch_size, num_train_timesteps, generator=None, device=None, low=0):
    """Uniform integer timesteps in [low, num_train_timesteps)."""
    return torch.randint(low, num_train_timesteps, (batch_size,), generator=generator, device=device)


def epsilon_loss(predict_noise, x0, noise, timesteps, alphas_cumprod):
    """MSE between the model's noise prediction on x_t and the noise that made x_t."""
    x_t = add_noise(x0, noise, alphas_cumprod, timesteps)
    predicted = predict_noise(x_t.to(x0.dtype), timesteps)
    return F.mse_loss(predicted.float(), noise.float())
