"""MZSR network: the 8-layer VDSR-style CNN of Meta-Transfer Learning for Zero-Shot SR.

Paper: Soh, Cho, Cho, "Meta-Transfer Learning for Zero-Shot Super-Resolution", CVPR 2020,
arXiv:2002.12213 (official TensorFlow code: JWSoh/MZSR, ``model.py``).

The network: conv3x3 3->64 + ReLU, six conv3x3 64->64 + ReLU, conv3x3 64->3, plus a global
residual: ``output = bicubic_up(x) + body(bicubic_up(x))``. Its size does not depend on the
scale (225,091 parameters with the defaults). This module is only the network; MZSR's
meta-transfer training (MAML over kernel tasks) and its test-time adaptation live elsewhere.

What differs here from the paper / the official release:

* Interface. MZSR feeds the network an image already upsampled by MATLAB-like bicubic
  (``imresize``); here ``forward`` takes the LR image ``(B, 3, h, w)`` and upsamples inside
  with ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``, so every
  network in ``srdistill.models`` has the same ``LR in -> (B, 3, s*h, s*w) out`` interface.
  The two upsamplings are not identical: PyTorch's cubic kernel has ``a = -0.75`` (MATLAB's
  ``a = -0.5``) and PyTorch replicates the border pixels where MATLAB mirrors. Weights
  trained on MATLAB-upsampled inputs therefore see slightly different inputs here; for MZSR's
  own protocol, with the input already at the target size, call ``forward_upsampled``.
* Layer names: one ``nn.Sequential`` called ``body`` (``body.0, body.2, ..., body.14`` are the
  convolutions ``conv1 ... conv8`` of the official code). The released weights are TensorFlow
  checkpoints (``MODEL/conv{k}/kernel`` HWIO and ``.../bias``); converting them (transpose
  each kernel to OIHW) is out of scope here: no loader is provided.
* Initialisation: PyTorch's default for convolutions (the official code uses TensorFlow's
  ``variance_scaling_initializer`` and zero biases).
* Input range ``[0, 1]`` float32 RGB, as the official code (images divided by 255).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MZSRNet(nn.Module):
    """The MZSR / VDSR-style CNN (arXiv:2002.12213) with bicubic upsampling inside.

    Args:
        scale: upscaling factor (>= 2).
        n_feats: channels of the hidden layers (64).
        n_layers: convolutions in total, including the first and the last (8).

    Shapes: ``forward``: ``(B, 3, h, w)`` float32 RGB in ``[0, 1]`` ->
    ``(B, 3, scale*h, scale*w)`` float32, roughly in ``[0, 1]`` (not clamped). Any
    ``h, w >= 1``.

    Raises:
        ValueError: ``scale < 2`` or ``n_layers < 2``.
    """

    def __init__(self, scale: int, *, n_feats: int = 64, n_layers: int = 8):
        super().__init__()
        if scale < 2:
            raise ValueError(f"scale must be >= 2, got {scale}")
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2 (first and last conv), got {n_layers}")
        self.scale = scale
        #: constructor kwargs, saved in checkpoints to rebuild the model
        self.config = dict(scale=scale, n_feats=n_feats, n_layers=n_layers)
        layers: list[nn.Module] = [nn.Conv2d(3, n_feats, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(n_layers - 2):
            layers += [nn.Conv2d(n_feats, n_feats, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(n_feats, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward_upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """The official network: ``x + body(x)`` on an already-upsampled ``(B, 3, H, W)``."""
        return x + self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        up = F.interpolate(
            x, size=(self.scale * h, self.scale * w), mode="bicubic", align_corners=False
        )  # (B, 3, s*h, s*w)
        return self.forward_upsampled(up)


if __name__ == "__main__":
    net = MZSRNet(2)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        y = net(torch.rand(1, 3, 17, 23))
    print(f"MZSR x2: {n:,} parameters, output {tuple(y.shape)}")
