"""srdistill: dataset distillation for image super-resolution (SRDD, MZSR, TripleD) on Ray.

The public API, importable from here, for example::

    import srdistill

    cfg = srdistill.load_config("demo", overrides=["train.iterations=500"])
    manifest = srdistill.run_pipeline("data/T91", "runs/py", cfg)  # the stages of `srdistill run`
    model, label = srdistill.load_upscaler("runs/py/train/model.safetensors", scale=2)
    print(srdistill.evaluate(model, "Set5", 2)["psnr_y"])

Each name is loaded from its module (``API`` says which) on first use, so ``import srdistill``
imports none of them (and the CLI starts without torch or Ray). The layers (docs/ARCHITECTURE.md):
``config``, ``storage``, ``corpus``, ``datasets``, ``weights`` on the ground; ``sr`` (protocol and
networks); ``distill`` and ``zeroshot`` (the methods); ``run`` (pipeline, Ray, report, benchmark,
upscaling); ``cli`` and ``k8s`` on top.
"""

from importlib import import_module as _import_module
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("srdistill")
except _metadata.PackageNotFoundError:  # a source tree on PYTHONPATH (e.g. a Ray job's working_dir)
    __version__ = "0+unknown"

#: The public API: name -> the module that defines it.
API = {
    # configuration (srdistill.config)
    "RunConfig": "srdistill.config",
    "TrainConfig": "srdistill.config",
    "MZSRConfig": "srdistill.config",
    "SynthConfig": "srdistill.config",
    "load_config": "srdistill.config",
    "preset_names": "srdistill.config",
    # data
    "resolve_dataset": "srdistill.datasets",
    "read_image": "srdistill.sr.imaging",
    "write_png": "srdistill.sr.imaging",
    "imresize": "srdistill.sr.imaging",
    # SR networks, training, the evaluation protocol
    "ARCHS": "srdistill.sr.models",
    "build_model": "srdistill.sr.models",
    "train_sr": "srdistill.sr.training",
    "load_checkpoint": "srdistill.sr.training",
    "evaluate": "srdistill.sr.evaluation",
    "psnr_y": "srdistill.sr.metrics",
    "ssim_y": "srdistill.sr.metrics",
    # zero-shot SR
    "meta_train": "srdistill.zeroshot.mzsr",
    "adapt": "srdistill.zeroshot.mzsr",
    "super_resolve": "srdistill.zeroshot.mzsr",
    "zssr": "srdistill.zeroshot.mzsr",
    # the main job, its report, upscaling files
    "run_pipeline": "srdistill.run.pipeline",
    "write_report": "srdistill.run.report",
    "load_upscaler": "srdistill.run.upscale",
    "upscale_image": "srdistill.run.upscale",
    "upscale_files": "srdistill.run.upscale",
}

__all__ = ["__version__", *API]


def __getattr__(name: str):
    """``srdistill.NAME`` of ``API``: imported from its module on first use, then cached."""
    if name not in API:
        raise AttributeError(f"module 'srdistill' has no attribute {name!r}")
    value = getattr(_import_module(API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
