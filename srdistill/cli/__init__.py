"""The ``srdistill`` command line (layer 4, with ``srdistill.k8s``): ``main`` holds the root
command ``app`` (run, finetune, synthesize, train, eval, upscale) and gathers the command groups
of ``bench``, ``zero_shot`` (mzsr, zssr), ``kubernetes`` (k8s) and ``data``; ``common`` holds
what they share. ``python -m srdistill.cli`` runs it."""

from srdistill.cli.main import app, main

__all__ = ["app", "main"]
