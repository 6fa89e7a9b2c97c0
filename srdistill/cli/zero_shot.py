"""``srdistill mzsr`` (meta-transfer training, import of the released TensorFlow models) and
``srdistill zssr adapt`` (zero-shot SR of one image: MZSR adaptation or ZSSR).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from srdistill.cli.common import (_ADDRESS_HELP, _TRAIN_GPUS_HELP, Scale, Subsample, _aliases, _fail, _items, _kernel,
                                  _model_config, _training_overrides)
from srdistill.config import MZSRConfig, RayConfig  # fmt: skip


mzsr_app = typer.Typer(no_args_is_help=True, help="MZSR: meta-transfer learning for zero-shot SR.")
zssr_app = typer.Typer(no_args_is_help=True, help="Zero-shot SR of one image: MZSR adaptation or ZSSR.")
_MZSR_SET_HELP = "override an MZSRConfig value, e.g. --set meta_iterations=2000 (repeatable)"


def _mzsr_config(config: Optional[Path], overrides: list[str], base: Optional[dict] = None, **fixed):
    """``_model_config`` of ``MZSRConfig``."""
    return _model_config(MZSRConfig, config, overrides, base, **fixed)


@mzsr_app.command("train", cls=_aliases({"--data": "--input"}))
def mzsr_train(
    inputs: list[str] = typer.Option(..., "--input", help="folder of HR training images (a corpus or "
                                     "a run's distilled/ set); repeatable, or comma-separated"),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="work folder (an existing one is resumed)"),
    scale: Optional[Scale] = typer.Option(None, "--scale", help="SR scale (MZSRConfig.scale, default 2)"),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="bicubic-pretrained mzsr "
                                              "checkpoint; without it one is trained first"),  # fmt: skip
    pretrain_iterations: int = typer.Option(20_000, "--pretrain-iterations", min=1,
                                            help="steps of the bicubic pretraining (RECIPES['mzsr'])"),  # fmt: skip
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="meta-training steps "
                                             "(MZSRConfig.meta_iterations)"),  # fmt: skip
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of MZSRConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help=_MZSR_SET_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Ray Train data-parallel workers; 0 = in-process"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help=_TRAIN_GPUS_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
) -> None:
    """Bicubic pretraining (L1, Adam 4e-4), then meta-transfer learning over random anisotropic
    Gaussian kernels (MZSR, arXiv 2002.12213). Writes OUT/pretrain/ and OUT/meta/; the result
    is OUT/mzsr.safetensors. Its settings are MZSRConfig's (--config, --set), which the run
    presets do not carry: there is no --preset here."""
    import shutil

    from srdistill.config import RECIPES, TrainConfig
    from srdistill.sr.evaluation import list_images

    cfg = _mzsr_config(config, [*overrides, *_training_overrides("", workers, gpus)], scale=scale,
                       meta_iterations=iterations)  # fmt: skip
    scale = cfg.scale
    data = [Path(d) for d in _items(inputs)]
    images = [str(p) for d in data for p in (list_images(d) if d.is_dir() else [])]
    missing = [str(d) for d in data if not d.is_dir()]
    if missing or not images:
        _fail(f"no HR images in {missing or [str(d) for d in data]}")
    from srdistill.run import runner
    from srdistill.sr.training import train_sr
    from srdistill.zeroshot.mzsr import meta_train

    workers = cfg.workers
    if workers:
        runner.init_ray(RayConfig(address=address))
    try:
        if pretrained is None:
            pre = TrainConfig(**{**RECIPES["mzsr"], "model": "mzsr", "iterations": pretrain_iterations,
                                 "workers": workers, "use_gpu": cfg.use_gpu, "device": cfg.device})  # fmt: skip
            train = runner.train_ray if workers else train_sr
            pretrained = train(pre, scale, images, out / "pretrain")
        meta = runner.meta_train_ray if workers else meta_train
        model = meta(cfg, images, out / "meta", init=str(pretrained))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    shutil.copy2(model, out / "mzsr.safetensors")
    typer.echo(f"wrote {out / 'mzsr.safetensors'} (pretrained: {pretrained})")


@mzsr_app.command("import-tf")
def mzsr_import_tf(
    prefix: Path = typer.Argument(..., help="TensorFlow checkpoint prefix, e.g. MZSR/Model/Directx2 (for "
                                  "Directx2.index + Directx2.data-00000-of-00001), one of its files, or its "
                                  "folder"),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="the .safetensors file to write"),
    scale: Optional[Scale] = typer.Option(None, "--scale", help="SR factor; known for the released Directx2, "
                                          "Bicubicx2, Pretrained (2) and Directx4 (4); needed otherwise"),  # fmt: skip
    stage: Literal["auto", "meta", "pretrained"] = typer.Option(
        "auto", "--stage", help="meta (meta-trained: adapts per image), pretrained (the bicubic pretraining: an "
        "init for `mzsr train --pretrained`) or auto (from the released name)"),  # fmt: skip
    subsample: Optional[Subsample] = typer.Option(None, "--subsample", help="the subsampling the model was "
                                                  "meta-trained for (known for the released models)"),  # fmt: skip
    scope: str = typer.Option("MODEL", "--scope", help="variable scope of the conv{k}/kernel|bias variables"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of MZSRConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help=_MZSR_SET_HELP + "; e.g. adapt_lr=[0.01,0.005]"),
) -> None:
    """Convert a TensorFlow checkpoint of JWSoh/MZSR (Model/Directx2, Directx4, Bicubicx2,
    Multi-scale; Pretrained/Pretrained) into an srdistill mzsr checkpoint, without TensorFlow.
    The settings each released model was published with (scale, subsampling, test-time
    learning rates) are recorded with it; options, --config and --set override them."""
    from srdistill.zeroshot import mzsr, tfbundle

    try:
        resolved = tfbundle.resolve_prefix(prefix)
    except FileNotFoundError as exc:
        _fail(str(exc))
    known = dict(mzsr.RELEASED_TF.get(resolved.name, {}))
    if stage == "auto" and not known:
        _fail(f"{resolved.name!r} is not a released MZSR model ({', '.join(mzsr.RELEASED_TF)}): "
              "give --stage meta or --stage pretrained")  # fmt: skip
    released_meta = known.pop("meta_trained", True)
    meta_trained = released_meta if stage == "auto" else stage == "meta"
    scale = scale if scale is not None else known.pop("scale", None)
    if scale is None:
        _fail(f"give --scale: the scale of {resolved.name!r} is not known from its name")
    base = {k: v for k, v in known.items() if k != "scale"}
    if 64 % scale:  # hr_patch/zssr_crop (meta-training/ZSSR only) must be multiples of the scale
        base.update(hr_patch=scale * (64 // scale), zssr_crop=scale * (128 // scale))
    cfg = _mzsr_config(config, overrides, base=base, scale=scale, subsample=subsample)
    try:
        path = mzsr.import_tf(resolved, out, cfg, meta_trained=meta_trained, scope=scope)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        _fail(str(exc).strip('"'))
    crc = "checksums verified" if tfbundle.CRC32C_AVAILABLE else "checksums NOT verified (pip install google-crc32c)"
    what = (f"meta-trained, {cfg.subsample} subsampling, adapt_lr {list(cfg.adapt_lr)}" if meta_trained
            else "pretrained (no MZSR config: an init for `mzsr train --pretrained`)")  # fmt: skip
    typer.echo(f"wrote {path}: mzsr x{cfg.scale} from {resolved} ({what}; {crc})")


def _steps_alias(args: list[str]) -> str:
    """The old ``zssr adapt --steps``: MZSR's adaptation steps with ``--model``, else ZSSR's cap."""
    return "--adapt-steps" if any(a == "--model" or a.startswith("--model=") for a in args) else "--iterations"


@zssr_app.command("adapt", cls=_aliases({"--lr-image": "--input", "--steps": _steps_alias}))
def zssr_adapt(
    lr_image: Path = typer.Option(..., "--input", help="the LR test image"),
    kernel: Path = typer.Option(..., "--kernel", help="its blur kernel (.mat, .npy or image)"),
    scale: Scale = typer.Option(2, "--scale", help="SR scale"),
    adapt_steps: Optional[int] = typer.Option(None, "--adapt-steps", min=0, help="MZSR (--model): test-time "
                                              "adaptation steps (default: the checkpoint's; 1 or 10)"),  # fmt: skip
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="ZSSR (no --model): at most this "
                                             "many training steps (default: 3000)"),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="the SR image (.png)"),
    model: Optional[Path] = typer.Option(None, "--model", help="meta-trained mzsr.safetensors; "
                                         "without it: ZSSR, a network trained from scratch on the image"),  # fmt: skip
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of MZSRConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help=_MZSR_SET_HELP),
    seed: int = typer.Option(0, "--seed", help="ZSSR's initialisation and crops"),
) -> None:
    """Super-resolve one image of a known (or estimated) blur kernel: MZSR's test-time
    adaptation of a meta-trained model (with the settings stored in it: adapt_lr, subsample,
    adapt_steps; --config/--set override them), or the ZSSR baseline."""
    import time

    from srdistill.sr import imaging
    from srdistill.zeroshot import mzsr

    if model is None and adapt_steps is not None:
        _fail("--adapt-steps adapts a meta-trained MZSR checkpoint: give --model (or --iterations for ZSSR)")
    if model is not None and iterations is not None:
        _fail("--iterations caps ZSSR (no --model); MZSR's adaptation takes --adapt-steps")
    net, meta = _load_mzsr(model, scale) if model is not None else (None, {})
    cfg = _mzsr_config(config, overrides, base=meta.get("mzsr_config"), scale=scale, zssr_iterations=iterations)
    k = _kernel(kernel)
    try:
        lr = imaging.read_image(lr_image)
        t0 = time.perf_counter()
        if net is not None:  # the checkpoint's adapt_lr/subsample unless --config/--set change them
            steps = cfg.adapt_steps if adapt_steps is None else adapt_steps
            sr = mzsr.zero_shot(net, lr, k, scale, steps=steps, lr=cfg.adapt_lr, subsample=cfg.subsample)
            what = f"MZSR({steps})"
        else:
            sr, info = mzsr.zssr(lr, k, scale, cfg, seed=seed, progress=True)
            what = f"ZSSR ({info['iterations']} steps)"
    except (FileNotFoundError, ValueError) as exc:  # ImageReadError is a ValueError
        _fail(str(exc))
    imaging.write_png(out, sr)
    typer.echo(f"{what}: {lr.shape[1]}x{lr.shape[0]} -> {sr.shape[1]}x{sr.shape[0]} in "
               f"{time.perf_counter() - t0:.1f} s, wrote {out}")  # fmt: skip


def _load_mzsr(path: Path, scale: int):
    """A meta-trained MZSR checkpoint (``mzsr.meta_train`` or ``mzsr.import_tf``), checked:
    ``(net, meta)``."""
    from srdistill.sr.training import load_checkpoint

    try:
        net, meta = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if meta["arch"] != "mzsr" or "mzsr_config" not in meta:
        _fail(f"{str(path)!r} is not a meta-trained MZSR checkpoint (arch {meta['arch']!r}); "
              "train one with `srdistill mzsr train` or convert a released one with "
              "`srdistill mzsr import-tf`")  # fmt: skip
    if meta["scale"] != scale:
        _fail(f"{str(path)!r} is for x{meta['scale']}, not --scale {scale}")
    return net, meta
