"""The authors' released TensorFlow models of MZSR (JWSoh/MZSR), converted into srdistill
checkpoints with the settings each was released with (``RELEASED_TF``, ``import_tf``).
"""

from __future__ import annotations

from pathlib import Path

from srdistill.config import MZSRConfig
from srdistill.sr.models.mzsr import from_tf_variables, tf_variable_names
from srdistill.sr.training import save_checkpoint
from srdistill.zeroshot import tfbundle

__all__ = [
    "RELEASED_TF",
    "import_tf",
]


#: JWSoh/MZSR's released TensorFlow checkpoints by name: whether meta-trained, and the
#: ``MZSRConfig`` settings each was released with (``main.py`` model choice, ``test.py``
#: ``methods`` and per-model learning rates: lr of step i, the last repeating). ``Multi-scale``
#: was meta-trained over several scales; its scale has to be given. ``Pretrained`` is the
#: large-scale bicubic x2 pretraining (``Large-Scale_Training``), the init of meta-training.
RELEASED_TF: dict[str, dict] = {
    "Directx2": {"meta_trained": True, "scale": 2, "subsample": "direct",
                 "adapt_lr": (2e-2, 1e-2, 1e-2, 1e-2, 5e-3)},
    "Multi-scale": {"meta_trained": True, "scale": None, "subsample": "direct",
                    "adapt_lr": (1e-2, 1e-2, 1e-2, 5e-3)},
    "Bicubicx2": {"meta_trained": True, "scale": 2, "subsample": "bicubic",
                  "adapt_lr": (1e-2, 1e-2, 1e-2, 1e-3)},
    "Directx4": {"meta_trained": True, "scale": 4, "subsample": "direct",
                 "adapt_lr": (1e-2, 5e-3, 5e-3, 5e-3, 5e-3, 1e-3)},
    "Pretrained": {"meta_trained": False, "scale": 2},
}  # fmt: skip


def import_tf(
    prefix: str | Path,
    out: str | Path,
    cfg: MZSRConfig,
    *,
    meta_trained: bool,
    scope: str = "MODEL",
) -> Path:
    """Convert an MZSR TensorFlow checkpoint into an srdistill ``mzsr`` checkpoint.

    Reads ``SCOPE/conv{1..n_layers}/kernel|bias`` from the tensor bundle at ``prefix``
    (``tfbundle``, no TensorFlow needed; other variables such as Adam slots are ignored),
    transposes the kernels HWIO -> OIHW (``models.mzsr.from_tf_variables``; values copied
    exactly) and writes ``out`` with ``training.save_checkpoint``: arch ``mzsr``, scale
    ``cfg.scale``, ``model_kwargs`` (``n_feats`` read from the weights, ``n_layers``,
    ``upsample="matlab"``), and ``imported_from`` (the prefix, its variables, whether the
    checksums were verified). A meta-trained model also gets ``mzsr_config`` (``cfg`` with
    ``n_feats`` as read), so ``srdistill eval --adapt-steps``, ``zssr adapt --model`` and
    ``mzsr.zero_shot`` use it as one of ours; a pretrained one (``meta_trained=False``) has no
    MZSR config and serves as ``meta_train``'s ``init`` (``mzsr train --pretrained``) or as a
    plain SR model.

    Args:
        prefix: checkpoint prefix (``Model/Directx2``), one of its files, or its folder.
        out: the ``.safetensors`` file to write (its folder is created).
        cfg: the settings recorded with the model (``scale``, ``n_layers``, ``subsample``,
            ``adapt_lr``, ...); ``RELEASED_TF`` has the released models' ones.
        meta_trained: record ``mzsr_config`` (True) or not (the bicubic pretraining).
        scope: the variables' scope (MZSR: ``MODEL``).

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: no ``PREFIX.index`` or a data file missing.
        ValueError: not a readable tensor bundle (compressed, truncated, corrupted: checksums
            are verified when ``google-crc32c`` is installed), MZSR variables missing (named),
            an unsupported dtype, or shapes that do not fit ``MZSRNet``.
    """
    bundle = tfbundle.TensorBundle(prefix)
    names = tf_variable_names(cfg.n_layers, scope)
    missing = [n for n in names if n not in bundle]
    if missing:
        others = [n for n in bundle.names() if n.endswith("/kernel")][:8]
        raise ValueError(f"checkpoint {bundle.prefix} lacks MZSR variables {missing} (n_layers="
                         f"{cfg.n_layers}, scope {scope!r}); its kernels: {others}")  # fmt: skip
    extra_layer = f"{scope}/conv{cfg.n_layers + 1}/kernel"
    variables = {n: bundle.read(n) for n in names + ([extra_layer] if extra_layer in bundle else [])}
    net = from_tf_variables(variables, cfg.scale, n_layers=cfg.n_layers, scope=scope)
    cfg = cfg.model_copy(update={"n_feats": net.config["n_feats"]})
    extra = {"imported_from": {"prefix": str(bundle.prefix), "format": "tensorflow-bundle-v2",
                               "variables": names, "crc32c_verified": tfbundle.CRC32C_AVAILABLE}}  # fmt: skip
    if meta_trained:
        extra["mzsr_config"] = cfg.model_dump(mode="json")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_kwargs = {k: v for k, v in net.config.items() if k != "scale"}
    save_checkpoint(net, out, arch="mzsr", scale=cfg.scale, model_kwargs=model_kwargs, extra=extra)
    return out
