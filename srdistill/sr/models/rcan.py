"""RCAN: Image Super-Resolution Using Very Deep Residual Channel Attention Networks.

Paper: Zhang, Li, Li, Wang, Zhong, Fu, ECCV 2018, arXiv:1807.02758.

Residual-in-residual trunk of ``n_resgroups`` residual groups (RG), each ``n_resblocks``
residual channel-attention blocks (RCAB: conv-ReLU-conv, then channel attention
``x * sigmoid(W_up relu(W_down avgpool(x)))`` with a ``reduction`` bottleneck) and a tail conv,
with a short skip per RG and a long skip over the trunk; EDSR's sub-pixel upsampler.

What differs here from the paper / the official release (yulunzhang/RCAN,
``RCAN_TrainCode/code/model/rcan.py``):

* Interface range. ``forward`` takes and returns ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``
  (like every network in ``srdistill.sr.models``) and multiplies by ``rgb_range`` inside, so the
  convolutions see the ``0..rgb_range`` values the official code trains on. With the default
  ``rgb_range=255`` official ``.pt`` checkpoints load with ``strict=True`` and work unchanged.
* The DIV2K mean shift (``sub_mean`` / ``add_mean``) is EDSR's frozen 1x1 convolution. The
  official code means to freeze it too but sets ``requires_grad`` on the module, not on its
  parameters, so its training may have moved them. Same keys and shapes: whatever values a
  checkpoint holds are loaded and used; here they are not trained further.
* ``res_scale`` scales each RCAB's residual branch. The official RCAB takes the argument but
  ignores it (the multiplication is commented out); the default 1.0 is identical.
* Nothing else: the same layer names (``sub_mean``, ``head.0``,
  ``body.{g}.body.{b}.body.{0,2}`` RCAB convs, ``body.{g}.body.{b}.body.3.conv_du.{0,2}``
  channel attention, ``body.{g}.body.{n_resblocks}`` group tail conv,
  ``body.{n_resgroups}`` trunk tail conv, ``tail.0.*`` upsampler, ``tail.1``, ``add_mean``).

Default configuration (the paper's): 10 groups x 20 RCABs, 64 features, reduction 16.
Trainable parameters: 15,444,643 at x2, 15,629,283 at x3, 15,592,355 at x4 (the two frozen
mean-shift convolutions add 24 more), the paper's "about 15.4 M" at x2.
"""

from __future__ import annotations

import torch
from torch import nn

from srdistill.sr.models.edsr import MeanShift, Upsampler


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv2d:
    """Convolution with bias and 'same' zero padding (odd ``kernel_size``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)


class CALayer(nn.Module):
    """Channel attention (RCAN Sec. 3.3): ``x * sigmoid(conv_du(global_avg_pool(x)))``.

    ``conv_du`` is 1x1 conv ``C -> C // reduction``, ReLU, 1x1 conv ``C // reduction -> C``,
    sigmoid (official key names ``conv_du.0`` / ``conv_du.2``). ``(B, C, H, W)`` in and out.

    Raises:
        ValueError: ``channels // reduction < 1``.
    """

    def __init__(self, channels: int, *, reduction: int = 16):
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(f"reduction {reduction} leaves no channels out of {channels}")
        self.conv_du = nn.Sequential(
            _conv(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            _conv(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.conv_du(x.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1) in (0, 1)
        return x * weights


class RCAB(nn.Module):
    """Residual channel-attention block: ``x + res_scale * CA(conv(relu(conv(x))))``.

    ``(B, n_feats, H, W)`` in and out. ``body`` = [conv, ReLU, conv, CALayer] (keys
    ``body.0``, ``body.2``, ``body.3.conv_du.*`` as in the official release).
    """

    def __init__(self, n_feats: int, *, reduction: int = 16, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(
            _conv(n_feats, n_feats),
            nn.ReLU(inplace=True),
            _conv(n_feats, n_feats),
            CALayer(n_feats, reduction=reduction),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class ResidualGroup(nn.Module):
    """``n_resblocks`` RCABs and a 3x3 conv, with a short skip: ``x + body(x)``.

    ``(B, n_feats, H, W)`` in and out; ``body.{n_resblocks}`` is the group's tail conv.
    """

    def __init__(self, n_feats: int, *, n_resblocks: int, reduction: int, res_scale: float):
        super().__init__()
        self.body = nn.Sequential(
            *[
                RCAB(n_feats, reduction=reduction, res_scale=res_scale)
                for _ in range(n_resblocks)
            ],
            _conv(n_feats, n_feats),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class RCAN(nn.Module):
    """RCAN (arXiv:1807.02758); the defaults are the paper's configuration.

    Args:
        scale: upscaling factor (3 or a power of 2: 2, 4, 8).
        n_resgroups: residual groups in the trunk (10).
        n_resblocks: RCABs per group (20).
        n_feats: feature channels (64).
        reduction: channel-attention bottleneck ratio (16: 64 -> 4 -> 64).
        res_scale: scaling of each RCAB's residual branch (1.0, what the official code does).
        rgb_range: value range the convolutions work in (255 as in the official release).

    Shapes: ``(B, 3, h, w)`` float32 RGB in ``[0, 1]`` -> ``(B, 3, scale*h, scale*w)`` float32,
    roughly in ``[0, 1]`` (not clamped). Any ``h, w >= 1``.

    Raises:
        ValueError: ``scale`` not 3 or a power of 2, or ``n_feats // reduction < 1``.
    """

    def __init__(
        self,
        scale: int,
        *,
        n_resgroups: int = 10,
        n_resblocks: int = 20,
        n_feats: int = 64,
        reduction: int = 16,
        res_scale: float = 1.0,
        rgb_range: float = 255.0,
    ):
        super().__init__()
        if not (scale == 3 or (scale >= 2 and scale & (scale - 1) == 0)):
            raise ValueError(f"RCAN supports scale 3 or a power of 2, got {scale}")
        self.scale = scale
        self.rgb_range = rgb_range
        #: constructor kwargs, saved in checkpoints to rebuild the model
        self.config = dict(
            scale=scale,
            n_resgroups=n_resgroups,
            n_resblocks=n_resblocks,
            n_feats=n_feats,
            reduction=reduction,
            res_scale=res_scale,
            rgb_range=rgb_range,
        )
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head = nn.Sequential(_conv(3, n_feats))
        self.body = nn.Sequential(
            *[
                ResidualGroup(
                    n_feats, n_resblocks=n_resblocks, reduction=reduction, res_scale=res_scale
                )
                for _ in range(n_resgroups)
            ],
            _conv(n_feats, n_feats),
        )
        self.tail = nn.Sequential(Upsampler(scale, n_feats), _conv(n_feats, 3))
        self.add_mean = MeanShift(rgb_range, sign=+1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sub_mean(x * self.rgb_range)  # (B, 3, h, w), 0..255 minus mean
        x = self.head(x)  # (B, F, h, w)
        x = x + self.body(x)  # long skip over the residual-in-residual trunk
        x = self.tail(x)  # (B, 3, s*h, s*w)
        return self.add_mean(x) / self.rgb_range


if __name__ == "__main__":
    net = RCAN(2)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        y = net(torch.rand(1, 3, 17, 23))
    print(f"RCAN x2: {n:,} trainable parameters, output {tuple(y.shape)}")
