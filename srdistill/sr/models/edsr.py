"""EDSR: Enhanced Deep Residual Networks for Single Image Super-Resolution.

Paper: Lim, Son, Kim, Nah, Lee, CVPR Workshops (NTIRE) 2017, arXiv:1707.02921.

What differs here from the paper / the official EDSR-PyTorch release:

* Interface range. ``forward`` takes and returns ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``
  (like every network in ``srdistill.sr.models``) and multiplies by ``rgb_range`` inside, so the
  convolutions see the ``0..rgb_range`` values the official code trains on. With the default
  ``rgb_range=255`` official checkpoints therefore load (``strict=True``) and work unchanged.
* Nothing else: same layer names (``sub_mean``, ``head.0``, ``body.{i}.body.{0,2}``,
  ``body.{n_resblocks}``, ``tail.0.*`` upsampler, ``tail.1``, ``add_mean``), same DIV2K mean
  shift with frozen 1x1 convolutions, same residual-block layout (conv-ReLU-conv, no batch
  norm, residual scaling ``res_scale``).

EDSR-baseline is the default configuration: 16 residual blocks, 64 features, res_scale 1;
1,369,859 trainable parameters at x2 (the two frozen mean-shift convolutions add 24 more).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: RGB mean of the DIV2K training set, in [0, 1] (official EDSR-PyTorch value).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 convolution with bias and 'same' zero padding."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)


class MeanShift(nn.Conv2d):
    """Add (``sign=+1``) or subtract (``sign=-1``) the dataset mean as a frozen 1x1 conv.

    Kept as a convolution with ``requires_grad=False`` parameters (not buffers) because the
    official checkpoints store ``sub_mean.weight/bias`` and ``add_mean.weight/bias``.
    Input and output ``(B, 3, H, W)`` in ``[0, rgb_range]`` (output shifted by the mean).
    """

    def __init__(self, rgb_range: float, *, sign: int, rgb_mean=DIV2K_RGB_MEAN):
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(rgb_mean))
        for p in self.parameters():
            p.requires_grad = False


class ResBlock(nn.Module):
    """``x + res_scale * conv(relu(conv(x)))`` on ``(B, n_feats, H, W)``; shape preserved."""

    def __init__(self, n_feats: int, *, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3(n_feats, n_feats), nn.ReLU(True), _conv3x3(n_feats, n_feats)
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: ``(B, C, H, W)`` -> ``(B, C, scale*H, scale*W)``.

    Scale 2^k: k times (conv C->4C, PixelShuffle(2)); scale 3: conv C->9C, PixelShuffle(3).

    Raises:
        ValueError: any other scale.
    """

    def __init__(self, scale: int, n_feats: int):
        layers: list[nn.Module] = []
        if scale >= 2 and scale & (scale - 1) == 0:  # power of two
            for _ in range(int(math.log2(scale))):
                layers += [_conv3x3(n_feats, 4 * n_feats), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [_conv3x3(n_feats, 9 * n_feats), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"EDSR upsampler supports scale 3 or a power of 2, got {scale}")
        super().__init__(*layers)


class EDSR(nn.Module):
    """EDSR (arXiv:1707.02921); the defaults give EDSR-baseline.

    Args:
        scale: upscaling factor (2, 3, 4 or 8).
        n_resblocks: residual blocks in the body (16 baseline, 32 full EDSR).
        n_feats: feature channels (64 baseline, 256 full EDSR).
        res_scale: residual scaling inside each block (1.0 baseline, 0.1 full EDSR).
        rgb_range: value range the convolutions work in (255 as in the official release).

    Shapes: ``(B, 3, h, w)`` float32 RGB in ``[0, 1]`` -> ``(B, 3, scale*h, scale*w)`` float32,
    roughly in ``[0, 1]`` (not clamped). Any ``h, w >= 1``.
    """

    def __init__(
        self,
        scale: int,
        *,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float = 1.0,
        rgb_range: float = 255.0,
    ):
        super().__init__()
        self.scale = scale
        self.rgb_range = rgb_range
        #: constructor kwargs, saved in checkpoints to rebuild the model
        self.config = dict(
            scale=scale,
            n_resblocks=n_resblocks,
            n_feats=n_feats,
            res_scale=res_scale,
            rgb_range=rgb_range,
        )
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head = nn.Sequential(_conv3x3(3, n_feats))
        self.body = nn.Sequential(
            *[ResBlock(n_feats, res_scale=res_scale) for _ in range(n_resblocks)],
            _conv3x3(n_feats, n_feats),
        )
        self.tail = nn.Sequential(Upsampler(scale, n_feats), _conv3x3(n_feats, 3))
        self.add_mean = MeanShift(rgb_range, sign=+1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sub_mean(x * self.rgb_range)  # (B, 3, h, w), 0..255 minus mean
        x = self.head(x)  # (B, F, h, w)
        x = x + self.body(x)  # global residual over the body
        x = self.tail(x)  # (B, 3, s*h, s*w)
        return self.add_mean(x) / self.rgb_range


if __name__ == "__main__":
    net = EDSR(2)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    y = net(torch.rand(1, 3, 24, 24))
    print(f"EDSR-baseline x2: {n:,} trainable parameters, output {tuple(y.shape)}")
