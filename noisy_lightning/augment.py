"""Cheap batched augmentation of the resident image tensor (no PIL, no per-sample Python)."""

from __future__ import annotations

import torch
from torch import Tensor


def random_shift(images: Tensor, max_shift: int, image_shape: tuple[int, int]) -> Tensor:
    """Translate each image of a flat batch ``[B, H*W]`` by its own random ``(dy, dx)`` in ``[-max_shift, max_shift]``.

    Pixels shifted in from outside take the batch's minimum value, i.e. the normalised background. The whole batch
    is one padded copy and one gather, so the cost is ``O(B * H * W)`` on whatever device ``images`` lives on.
    """
    if max_shift <= 0:
        return images
    height, width = image_shape
    batch = images.shape[0]
    background = images.detach().amin()
    padded = torch.nn.functional.pad(images.reshape(batch, height, width), (max_shift,) * 4, value=0.0)
    # pad(value=...) needs a Python float; padding with 0 then filling the border keeps this free of host syncs.
    border = torch.ones(height + 2 * max_shift, width + 2 * max_shift, dtype=torch.bool, device=images.device)
    border[max_shift : max_shift + height, max_shift : max_shift + width] = False
    padded = torch.where(border, background, padded)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch, 1), device=images.device)
    rows = (offsets[0] + torch.arange(height, device=images.device)).unsqueeze(2)  # [B, H, 1]
    cols = (offsets[1] + torch.arange(width, device=images.device)).unsqueeze(1)  # [B, 1, W]
    shifted = padded[torch.arange(batch, device=images.device).view(batch, 1, 1), rows, cols]
    return shifted.reshape(batch, height * width)
