"""Frames <-> VAE latents, in slices of a few frames so long clips fit in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

Progress = Callable[[int, int], None] | None


def latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


def encode_frames(vae, frames: np.ndarray, batch: int = 4, progress: Progress = None) -> torch.Tensor:
    """uint8 RGB (m, H, W, 3) -> latents (m, 4, H/8, W/8) float32: the latent MEAN times the VAE scale."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    latents = []
    with torch.inference_mode():
        for start in range(0, len(frames), batch):
            chunk = torch.from_numpy(frames[start:start + batch]).to(device)
            pixels = chunk.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0  # (b, 3, H, W) in [-1, 1]
            mean = vae.encode(pixels).latent_dist.mean
            latents.append(mean.float() * vae.config.scaling_factor)
            if progress:
                progress(min(start + batch, len(frames)), len(frames))
    return torch.cat(latents).cpu()


def decode_latents(vae, latents: torch.Tensor, batch: int = 4, progress: Progress = None) -> np.ndarray:
    """latents (m, 4, h, w) -> uint8 RGB (m, 8h, 8w, 3)."""
    return np.stack(list(decoded_frames(vae, latents, batch, progress)))


def decoded_frames(vae, latents: torch.Tensor, batch: int = 4, progress: Progress = None) -> Iterator[np.ndarray]:
    """The frames of `latents` (m, 4, h, w) one at a time, uint8 RGB (8h, 8w, 3), decoded `batch` at a
    time when asked for: a writer consuming them never holds more than one slice of decoded frames."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    for start in range(0, len(latents), batch):
        with torch.inference_mode():
            chunk = latents[start:start + batch].to(device=device, dtype=dtype) / vae.config.scaling_factor
            pixels = vae.decode(chunk).sample.float()  # (b, 3, H, W) in about [-1, 1]
            images = ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
            frames = images.permute(0, 2, 3, 1).cpu().numpy()
        if progress:
            progress(min(start + batch, len(latents)), len(latents))
        yield from frames


class DecodedFrames:
    """The VAE decode of `latents` (a tensor, or rows read from a file a range at a time, such as
    `cache.LatentRows`) as a sequence of uint8 frames (m, 8h, 8w, 3): iteration and in-order indexing
    decode `batch` frames at a time when asked for, so that a writer walking through a long clip holds
    one slice of decoded frames, never the clip. `np.asarray` decodes them all."""

    dtype = np.dtype(np.uint8)

    def __init__(self, vae, latents, batch: int = 4, progress: Progress = None):
        self.vae, self.latents, self.batch, self.progress = vae, latents, batch, progress
        self._start, self._frames = -1, None
        _, _, height, width = latents.shape
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.shape = (len(latents), height * scale, width * scale, 3)

    def __len__(self) -> int:
        return len(self.latents)

    def __iter__(self) -> Iterator[np.ndarray]:
        return decoded_frames(self.vae, self.latents, self.batch, self.progress)

    def __getitem__(self, index: int) -> np.ndarray:
        index = range(len(self))[index]
        if self._frames is None or not self._start <= index < self._start + self.batch:
            self._start = index - index % self.batch
            self._frames = np.stack(list(decoded_frames(self.vae, self.latents[self._start:self._start + self.batch],
                                                        self.batch)))
            if self.progress:
                self.progress(min(self._start + self.batch, len(self)), len(self))
        return self._frames[index - self._start]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        frames = np.stack(list(self))
        return frames if dtype is None else frames.astype(dtype)
