"""SR networks, one file each. ``ARCHS`` maps the names used in configs to classes.

Every network takes ``(B, 3, h, w)`` float32 RGB in ``[0, 1]`` and returns
``(B, 3, scale*h, scale*w)`` float32 (not clamped), and keeps its constructor kwargs in
``.config`` so a checkpoint can rebuild it.
"""

from __future__ import annotations

from torch import nn

from srdistill.sr.models.edsr import EDSR
from srdistill.sr.models.espcn import ESPCN
from srdistill.sr.models.mzsr import MZSRNet
from srdistill.sr.models.rcan import RCAN
from srdistill.sr.models.swinir import SwinIR

__all__ = ["ARCHS", "EDSR", "ESPCN", "MZSRNet", "RCAN", "SwinIR", "build_model"]

ARCHS: dict[str, type[nn.Module]] = {
    "edsr-baseline": EDSR,
    "espcn": ESPCN,
    "rcan": RCAN,
    "swinir-light": SwinIR,
    "mzsr": MZSRNet,
}


def build_model(name: str, scale: int, **kwargs) -> nn.Module:
    """Instantiate ``ARCHS[name](scale, **kwargs)``.

    Args:
        name: a key of ``ARCHS`` (``"edsr-baseline"``, ``"espcn"``, ``"rcan"``,
            ``"swinir-light"``, ``"mzsr"``).
        scale: upscaling factor.
        **kwargs: constructor kwargs of that network (e.g. ``n_resblocks`` for EDSR).

    Raises:
        ValueError: unknown ``name`` (the allowed names are listed).
        TypeError: a kwarg the network does not take.
    """
    if name not in ARCHS:
        raise ValueError(f"model {name!r} is not one of {sorted(ARCHS)}")
    return ARCHS[name](scale, **kwargs)
