"""Caches that keep encoders out of the training step: text embeddings and VAE latents.

- ``TextEmbeddingCache``: one caption → one set of embedding tensors, computed once by the caller's
  encoder and kept in memory (and on disk when given a folder), so a step never runs T5/CLIP.
- ``LatentCache``: a sample key (see ``train.datasets.PairedCropDataset``: fixed variants) → tensors,
  computed once. Store the VAE's distribution (mean, std), not a sample, so each step can still draw
  ``mean + std·ε`` like training without a cache.
Disk entries are safetensors files written atomically; their names hash the key and a model tag so a
cache folder shared between models never mixes them up.
"""
import hashlib
import os

import torch
from safetensors.torch import load_file, save_file


def _digest(*parts):
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:24]


class TensorCache:
    """key → dict of tensors, in memory and optionally in ``folder`` (``tag`` names the producing model)."""

    def __init__(self, folder=None, tag="", keep_in_memory=True, device=None):
        self.folder = os.fspath(folder) if folder else None
        self.tag = tag
        self.keep_in_memory = keep_in_memory
        self.device = device
        self.memory = {}
        self.hits = 0
        self.misses = 0
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)

    def _path(self, key):
        return os.path.join(self.folder, f"{_digest(self.tag, key)}.safetensors")

    def _to_device(self, tensors):
        return {k: v.to(self.device) for k, v in tensors.items()} if self.device is not None else tensors

    def get(self, key, compute):
        """Cached tensors of ``key``; on a miss ``compute()`` (→ dict of tensors) runs once and is stored."""
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        path = self._path(key) if self.folder else None
        if path and os.path.isfile(path):
            self.hits += 1
            tensors = self._to_device(load_file(path))
        else:
            self.misses += 1
            with torch.no_grad():
                tensors = {k: v.detach() for k, v in compute().items()}
            if path:
                tmp = f"{path}.tmp-{os.getpid()}"
                save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp)
                os.replace(tmp, path)
        if self.keep_in_memory:
            self.memory[key] = tensors
        return tensors

    def __len__(self):
        return len(self.memory)


class TextEmbeddingCache(TensorCache):
    """Caption → embeddings. ``get(caption, encode)`` with ``encode(caption)`` → dict of tensors."""

    def get(self, caption, encode):
        return super().get(caption, lambda: encode(caption))


class LatentCache(TensorCache):
    """Sample key → latent tensors (e.g. VAE mean and std of target, background and foreground)."""


def sample_latent(mean, std, generator=None):
    """One draw from a cached diagonal Gaussian: mean + std·ε."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean.float() + std.float() * noise).to(mean.dtype)
