"""Cheap batched augmentation of the resident image tensor (no PIL, no per-sample Python)."""

from __future__ import annotations

import torch
from torch import Tensor


def random_shift(images: Tensor, max_shift: int, image_shape: tuple[int, ...]) -> Tensor:
    """Translate each image of a batch by its own random ``(dy, dx)`` in ``[-max_shift, max_shift]``.

    ``images`` is ``[B, ...]`` holding ``B`` images of ``image_shape``: ``(H, W)`` or ``(C, H, W)``, flattened or
    not, square or not. Pixels shifted in from outside take each channel's minimum over the batch, i.e. the
    normalised background. The whole batch is one padded copy and one gather, ``O(B * C * H * W)`` on whatever
    device ``images`` lives on. The result has the shape of ``images``.
    """
    if max_shift <= 0:
        return images
    channels, height, width = (1, *image_shape) if len(image_shape) == 2 else image_shape
    batch = images.shape[0]
    device = images.device
    planes = images.reshape(batch, channels, height, width)
    background = planes.detach().amin(dim=(0, 2, 3), keepdim=True)
    padded = torch.nn.functional.pad(planes, (max_shift,) * 4, value=0.0)
    # pad(value=...) needs a Python float; padding with 0 then filling the border keeps this free of host syncs.
    border = torch.ones(height + 2 * max_shift, width + 2 * max_shift, dtype=torch.bool, device=device)
    border[max_shift : max_shift + height, max_shift : max_shift + width] = False
    padded = torch.where(border, background, padded)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch, 1), device=device)
    rows = (offsets[0] + torch.arange(height, device=device)).view(batch, 1, height, 1)
    cols = (offsets[1] + torch.arange(width, device=device)).view(batch, 1, 1, width)
    sample = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    channel = torch.arange(channels, device=device).view(1, channels, 1, 1)
    return padded[sample, channel, rows, cols].reshape(images.shape)
