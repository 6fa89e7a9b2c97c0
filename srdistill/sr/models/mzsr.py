"""MZSR network: the 8-layer VDSR-style CNN of Meta-Transfer Learning for Zero-Shot SR.

Paper: Soh, Cho, Cho, "Meta-Transfer Learning for Zero-Shot Super-Resolution", CVPR 2020,
arXiv:2002.12213 (official TensorFlow code: JWSoh/MZSR, ``model.py``).

The network: conv3x3 3->64 + ReLU, six conv3x3 64->64 + ReLU, conv3x3 64->3, plus a global
residual: ``output = up(x) + body(up(x))`` where ``up`` is bicubic upsampling to the HR size.
Its size does not depend on the scale (225,091 parameters with the defaults). This module is
only the network (and the conversion of the released TensorFlow weights); MZSR's meta-transfer
training (MAML over kernel tasks) and its test-time adaptation live in ``srdistill.zeroshot.mzsr``.

What differs here from the paper / the official release:

* Interface. MZSR feeds the network an image already upsampled by its MATLAB-like bicubic
  ``imresize`` (``test.py`` ``forward_pass``; the large-scale pretraining does the same,
  ``Large-Scale_Training/train.py``). Here ``forward`` takes the LR image ``(B, 3, h, w)`` and
  upsamples inside, so every network in ``srdistill.sr.models`` has the same
  ``LR in -> (B, 3, s*h, s*w) out`` interface; ``forward_upsampled`` is the official network on
  an already-upsampled input. ``upsample="matlab"`` (the default) upsamples as MZSR does:
  MATLAB's bicubic (``a = -0.5``, mirrored borders; ``imaging.imresize`` as a matrix per axis,
  computed in the input's dtype), so ``forward(lr)`` equals ``forward_upsampled`` of
  ``mzsr.upsample(lr)`` up to float32 rounding. ``upsample="torch"`` (what this network did
  before) uses ``F.interpolate(mode="bicubic")`` (``a = -0.75``, replicated borders) instead.
  Checkpoints keep the choice in their ``model_kwargs``; older ones, without it, load as
  ``matlab`` (a network pretrained on torch-upsampled input should be rebuilt with
  ``upsample="torch"`` to be evaluated as it was trained).
* Layer names: one ``nn.Sequential`` called ``body`` (``body.0, body.2, ..., body.14`` are the
  convolutions ``conv1 ... conv8`` of the official code). The released weights are TensorFlow
  checkpoints (``MODEL/conv{k}/kernel`` HWIO and ``MODEL/conv{k}/bias``); ``from_tf_variables``
  builds the network from them (each kernel transposed to OIHW; ``srdistill mzsr import-tf``).
  TensorFlow's ``conv2d`` with ``padding="SAME"`` is, for 3x3 stride 1, a cross-correlation
  with one pixel of zero padding, as ``nn.Conv2d(padding=1)``.
* Initialisation: PyTorch's default for convolutions (the official code uses TensorFlow's
  ``variance_scaling_initializer`` and zero biases).
* Input range ``[0, 1]`` float32 RGB, as the official code (images divided by 255).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srdistill.sr import imaging

Upsample = Literal["matlab", "torch"]


@lru_cache(maxsize=64)
def _matlab_matrix(in_len: int, out_len: int) -> np.ndarray:
    """``(out_len, in_len)`` float64: MATLAB bicubic resizing of one axis as a matrix (the
    resize of the identity, exact since ``imresize`` is linear along each axis)."""
    return imaging.imresize(np.eye(in_len), output_shape=(out_len, in_len))


def matlab_upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB bicubic upsampling (``imaging.imresize``, floats, no rounding) of a batch.

    ``(B, C, h, w)`` float -> ``(B, C, scale*h, scale*w)`` of the same dtype and device; each
    axis is one matrix product (``imresize``'s weights with its mirrored borders).
    """
    h, w = x.shape[-2:]
    mh = torch.from_numpy(_matlab_matrix(h, scale * h)).to(x.device, x.dtype)  # (s*h, h)
    mw = torch.from_numpy(_matlab_matrix(w, scale * w)).to(x.device, x.dtype)  # (s*w, w)
    return mh @ x @ mw.T  # (B, C, s*h, s*w)


class MZSRNet(nn.Module):
    """The MZSR / VDSR-style CNN (arXiv:2002.12213) with bicubic upsampling inside.

    Args:
        scale: upscaling factor (>= 2).
        n_feats: channels of the hidden layers (64).
        n_layers: convolutions in total, including the first and the last (8).
        upsample: ``matlab`` (MZSR's input, the default) or ``torch`` bicubic; see the module
            header.

    Shapes: ``forward``: ``(B, 3, h, w)`` float32 RGB in ``[0, 1]`` ->
    ``(B, 3, scale*h, scale*w)`` float32, roughly in ``[0, 1]`` (not clamped). Any
    ``h, w >= 1``.

    Raises:
        ValueError: ``scale < 2``, ``n_layers < 2`` or an unknown ``upsample``.
    """

    def __init__(self, scale: int, *, n_feats: int = 64, n_layers: int = 8, upsample: Upsample = "matlab"):
        super().__init__()
        if scale < 2:
            raise ValueError(f"scale must be >= 2, got {scale}")
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2 (first and last conv), got {n_layers}")
        if upsample not in ("matlab", "torch"):
            raise ValueError(f"upsample {upsample!r} is not one of 'matlab', 'torch'")
        self.scale = scale
        self.upsample = upsample
        #: constructor kwargs, saved in checkpoints to rebuild the model
        self.config = dict(scale=scale, n_feats=n_feats, n_layers=n_layers, upsample=upsample)
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
        if self.upsample == "matlab":
            up = matlab_upsample(x, self.scale)  # (B, 3, s*h, s*w)
        else:
            up = F.interpolate(x, size=(self.scale * h, self.scale * w), mode="bicubic", align_corners=False)
        return self.forward_upsampled(up)


def tf_variable_names(n_layers: int = 8, scope: str = "MODEL") -> list[str]:
    """The TensorFlow variables of MZSR's network (``model.py`` ``Weights``), in layer order:
    ``SCOPE/conv{k}/kernel`` and ``SCOPE/conv{k}/bias`` for ``k = 1..n_layers``."""
    return [f"{scope}/conv{k}/{part}" for k in range(1, n_layers + 1) for part in ("kernel", "bias")]


def from_tf_variables(
    variables: Mapping[str, np.ndarray],
    scale: int,
    *,
    n_layers: int = 8,
    scope: str = "MODEL",
    upsample: Upsample = "matlab",
) -> MZSRNet:
    """An ``MZSRNet`` holding the weights of MZSR's TensorFlow variables.

    ``SCOPE/conv{k}/kernel`` ``(3, 3, in, out)`` (HWIO) becomes ``body.{2(k-1)}.weight``
    ``(out, in, 3, 3)`` (OIHW) and ``SCOPE/conv{k}/bias`` ``(out,)`` its bias; the values are
    copied exactly (float32). ``n_feats`` is read from ``conv1``'s kernel.

    Args:
        variables: name -> array, e.g. ``tfbundle.read_bundle(prefix, tf_variable_names())``;
            other names are ignored.
        scale: the SR factor the model is used at (MZSR's network does not depend on it).
        n_layers: convolutions expected (MZSR: 8).
        scope: the variable scope (MZSR: ``MODEL``).
        upsample: the new network's ``upsample``.

    Returns:
        The network, in eval mode, on the CPU.

    Raises:
        ValueError: variables missing (all named), a ``conv{n_layers+1}`` present (more layers
            than expected), a non-floating dtype, or a shape that does not fit the network
            (the variable, its shape and the expected one are named).
    """
    names = tf_variable_names(n_layers, scope)
    missing = [n for n in names if n not in variables]
    if missing:
        raise ValueError(f"the checkpoint lacks MZSR variables {missing} ({len(names)} expected for "
                         f"n_layers={n_layers}, scope {scope!r})")  # fmt: skip
    extra = f"{scope}/conv{n_layers + 1}/kernel"
    if extra in variables:
        raise ValueError(f"the checkpoint has {extra}: more than n_layers={n_layers} convolutions")
    for n in names:
        a = np.asarray(variables[n])
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{n} has dtype {a.dtype}, not a floating type: unsupported")
    first = np.asarray(variables[names[0]])
    if first.ndim != 4:
        raise ValueError(f"{names[0]} has shape {first.shape}, expected (3, 3, 3, n_feats) (HWIO)")
    net = MZSRNet(scale, n_feats=int(first.shape[3]), n_layers=n_layers, upsample=upsample)
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    state = {}
    for k, conv in enumerate(convs, start=1):
        o, i, kh, kw = conv.weight.shape
        kernel, bias = (np.asarray(variables[f"{scope}/conv{k}/{p}"]) for p in ("kernel", "bias"))
        for name, got, want in ((f"{scope}/conv{k}/kernel", kernel.shape, (kh, kw, i, o)),
                                (f"{scope}/conv{k}/bias", bias.shape, (o,))):  # fmt: skip
            if tuple(got) != want:
                raise ValueError(f"{name} has shape {tuple(got)}, expected {want} for MZSRNet "
                                 f"(n_feats={first.shape[3]}, n_layers={n_layers})")  # fmt: skip
        idx = 2 * (k - 1)
        state[f"body.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), np.float32))
        state[f"body.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, np.float32))
    net.load_state_dict(state, strict=True)
    return net.eval()


if __name__ == "__main__":
    net = MZSRNet(2)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        y = net(torch.rand(1, 3, 17, 23))
    print(f"MZSR x2: {n:,} parameters, output {tuple(y.shape)}")
