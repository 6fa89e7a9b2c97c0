"""ESPCN: efficient sub-pixel convolutional network, with a global bicubic residual.

Paper: Shi, Caballero, Huszár, Totz, Aitken, Bishop, Rueckert, Wang, "Real-Time Single Image
and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network",
CVPR 2016, arXiv:1609.05158.

Layers as in the paper (f1=5, n1=64; f2=3, n2=32; f3=3, then PixelShuffle(scale)). What
differs here (our changes):

* RGB in and out (the paper works on the Y channel only): the last conv has ``3*scale**2``
  channels.
* A global residual: ``output = network(x) + bicubic_upsample(x)`` (``F.interpolate``,
  ``mode='bicubic'``, ``align_corners=False``). The network learns only the missing detail,
  which makes training converge in minutes on a CPU.
* The last convolution starts at zero, so the untrained model is exactly that bicubic
  upsampling and training can only start from there.
* tanh as in the paper by default; ``act="relu"`` is offered, but it is fragile here: with the
  zero-initialised last layer and Adam at 1e-3 on whole-image crops, 2 of 3 seeds on the 291
  corpus lost every second-layer unit (dead ReLUs), leaving bias + bicubic (docs/RESULTS.md).
* 'Same' zero padding, so the output is exactly ``scale`` times the input for any size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class ESPCN(nn.Module):
    """ESPCN (arXiv:1609.05158) on RGB with a global bicubic residual.

    Args:
        scale: upscaling factor (>= 2).
        n_feats: channels of the first layer (64 in the paper); the second has half.
        act: hidden activation, ``"tanh"`` (paper, default) or ``"relu"``.

    Shapes: ``(B, 3, h, w)`` float32 RGB in ``[0, 1]`` -> ``(B, 3, scale*h, scale*w)`` float32,
    roughly in ``[0, 1]`` (not clamped). Any ``h, w >= 1``.

    Raises:
        ValueError: ``scale < 2`` or an unknown ``act``.
    """

    def __init__(self, scale: int, *, n_feats: int = 64, act: Literal["relu", "tanh"] = "tanh"):
        super().__init__()
        if scale < 2:
            raise ValueError(f"scale must be >= 2, got {scale}")
        if act not in _ACTS:
            raise ValueError(f"act {act!r} is not one of {sorted(_ACTS)}")
        self.scale = scale
        #: constructor kwargs, saved in checkpoints to rebuild the model
        self.config = dict(scale=scale, n_feats=n_feats, act=act)
        self.body = nn.Sequential(
            nn.Conv2d(3, n_feats, kernel_size=5, padding=2),
            _ACTS[act](),
            nn.Conv2d(n_feats, n_feats // 2, kernel_size=3, padding=1),
            _ACTS[act](),
            nn.Conv2d(n_feats // 2, 3 * scale**2, kernel_size=3, padding=1),
            nn.PixelShuffle(scale),
        )
        nn.init.zeros_(self.body[4].weight)
        nn.init.zeros_(self.body[4].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.body(x) + up  # (B, 3, s*h, s*w)


if __name__ == "__main__":
    net = ESPCN(2)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    y = net(torch.rand(1, 3, 17, 23))
    print(f"ESPCN x2: {n:,} parameters, output {tuple(y.shape)}")
