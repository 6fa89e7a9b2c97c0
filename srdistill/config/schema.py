"""The typed, frozen config of every stage (one pydantic model each; unknown keys are an error,
string options ``Literal``) and ``RunConfig``, which nests them; the recipes and patch presets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


#: Patch geometry presets: name -> (patch size, stride) in HR pixels.
PATCH_PRESETS: dict[str, tuple[int, int]] = {
    "srdd": (512, 256),  # SRDD's released code (sliding window 512, stride 256)
    "div2k": (192, 96),  # DIV2K-style 192x192 HR crops (48x48 LR at x4), half overlap
}

Score = Literal["psnr_bic", "grad"]
#: Scores ``select.score`` may rank by: the mined ones, and ``proxy_error`` (``srdistill.distill.proxy_error``,
#: a column the caller attaches).
SelectScore = Literal["psnr_bic", "grad", "proxy_error"]
#: Complexity scores of a patch (``srdistill.distill.complexity``; TripleD): all higher = more complex.
ComplexityScore = Literal["vit_complexity", "entropy", "grad_energy"]
#: ``select.method``s that run on a feature space (``select.features``).
FEATURE_METHODS = ("kcenter", "typiclust")
#: For each patch score, whether a lower value means a harder (more valuable) patch.
LOWER_IS_HARDER: dict[str, bool] = {
    "psnr_bic": True, "grad": False, "vit_complexity": False, "entropy": False, "grad_energy": False,
    "proxy_error": False,
}  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_USE_GPU_HELP = ("Ray Train workers on GPUs: None (auto) = when the Ray cluster has GPUs, true = "
                 "required (an error without GPUs), false = CPU only")


def _check_gpu_flags(cfg: Any, section: str) -> None:
    """``use_gpu: true`` with ``device: cpu`` contradicts itself: a ValueError naming both."""
    if cfg.use_gpu is True and cfg.device == "cpu":
        raise ValueError(f"{section}.use_gpu true contradicts {section}.device 'cpu'")


class MineConfig(_Strict):
    """Sliding-window patch mining and scoring (SRDD §3.1).

    ``patch_preset`` expands to ``patch_size``/``stride`` (see ``PATCH_PRESETS``).
    Keep rules: ``threshold`` keeps patches harder than ``threshold`` (``psnr_bic < t`` dB or
    ``grad > t``); ``top_fraction`` keeps the hardest ``top_fraction`` of all patches; ``all``
    keeps every patch.

    ``psnr_bic_resize`` picks the bicubic of the ``psnr_bic`` score's x``bic_scale``
    down-then-up: ``matlab`` (``imaging.imresize``: Keys a = -0.5, antialiased when
    downscaling, uint8 rounding after each pass) or ``opencv`` (``cv2.resize`` ``INTER_CUBIC``:
    a = -0.75, no antialiasing, float32 throughout), the resize of SRDD's released
    ``src/1_select_patches.py``. On natural images ``matlab`` reads higher, so a fixed
    threshold keeps fewer patches under it (see ``srdistill.distill.mining``).
    """

    patch_preset: Literal["srdd", "div2k"] | None = None
    patch_size: int = Field(192, ge=8)
    stride: int = Field(96, ge=1)
    bic_scale: int = Field(4, ge=2, description="down/up factor of the psnr_bic score")
    psnr_bic_window: Literal["patch", "image"] = "image"
    psnr_bic_resize: Literal["matlab", "opencv"] = "matlab"
    keep_score: Score = "psnr_bic"
    keep_rule: Literal["threshold", "top_fraction", "all"] = "threshold"
    threshold: float = 23.0
    top_fraction: float = Field(0.5, gt=0.0, le=1.0)
    max_side: int = Field(10_000, ge=1, description="images with a longer side are skipped")
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    images_per_task: int = Field(4, ge=1, description="images per Ray Data batch (bench/bench_mining.py)")
    images_per_shard: int = Field(32, ge=1, description="images per shard: the unit of work, retry and "
                                  "resume of mining and embedding (one part file each)")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("patch_preset"):
            data = _expand_patch_preset(data, "")
        return data

    @model_validator(mode="after")
    def _check(self) -> "MineConfig":
        if self.patch_size % self.bic_scale:
            raise ValueError(
                f"patch_size {self.patch_size} must be divisible by bic_scale {self.bic_scale}"
            )
        return self


def _expand_patch_preset(mine: dict, where: str) -> dict:
    """``mine`` with its ``patch_preset`` expanded into ``patch_size``/``stride``.

    A ``patch_size`` or ``stride`` given next to the ``patch_preset`` (in the same mapping:
    the same file, the same ``--set``) that differs from what the preset derives is a real
    conflict: a ValueError naming both (never silently resolved). ``where`` names the source.
    """
    name = mine["patch_preset"]
    if name not in PATCH_PRESETS:
        raise ValueError(f"patch_preset {name!r} is not one of {sorted(PATCH_PRESETS)}")
    derived = dict(zip(("patch_size", "stride"), PATCH_PRESETS[name]))
    for key, value in derived.items():
        if mine.get(key) is not None and mine[key] != value:
            raise ValueError(
                f"{where + ': ' if where else ''}mine.{key} {mine[key]} conflicts with mine.patch_preset {name!r} (which sets "
                f"{key} {value}): give one of them, or set mine.patch_preset=null"
            )
    return {**mine, **derived}


class _ActorStage(_Strict):
    """Execution settings shared by the stages that run a model in Ray Data actors over the
    mined shards (``embed``, ``complexity``): patches per forward pass, the actor pool, torch
    threads and device, and the seed of a random-init model.

    ``device``: ``auto`` places the actors on GPUs (``actor_num_gpus`` each) when the Ray
    cluster has GPUs, else on CPUs; ``cpu`` never asks for a GPU; ``cuda`` needs GPUs in the
    cluster (an error before any work otherwise). ``num_actors: 0`` runs the stage in the driver
    process instead (on its CUDA device when the stage gets a GPU), or, where the driver has no
    CUDA device but the stage should get a GPU, in one actor with a GPU (as training with
    ``workers: 0``). See ``runner.plan_placement``.
    """

    batch_size: int = Field(32, ge=1)
    num_actors: int = Field(1, ge=0, description="Ray Data actors; 0: in the driver process, no actor to "
                            "start (one GPU actor instead where the driver has no CUDA device and the "
                            "cluster has GPUs)")  # fmt: skip
    actor_num_cpus: float = Field(0.5, gt=0.0, description="fractional CPUs per actor")
    actor_num_gpus: float = Field(1.0, gt=0.0, description="GPUs per actor when the stage runs on GPUs "
                                  "(a fraction lets actors share one)")  # fmt: skip
    num_threads: int | None = Field(None, ge=1, description="torch threads per actor; None: Ray's")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


class EmbedConfig(_ActorStage):
    """CLIP image embeddings of the kept patches.

    ``model`` is a local directory or a Hugging Face id (transformers backend; downloaded into
    the HF cache, or from the cache only with ``HF_HUB_OFFLINE=1``), or an open_clip
    architecture name with ``pretrained`` a local weights file (open_clip backend). Without
    weights the stage stops unless
    ``allow_random_init`` is set; ``random_init`` then picks the architecture size.
    """

    batch_size: int | None = Field(None, ge=1, description="patches per forward pass; None: by the device "
                                   "the actor gets (embedding.AUTO_BATCH: 32 on a CPU, 256 on a GPU)")  # fmt: skip
    backend: Literal["transformers", "open_clip"] = "transformers"
    model: str = "openai/clip-vit-base-patch32"
    pretrained: str | None = None
    allow_random_init: bool = False
    random_init: Literal["vit-b-32", "tiny"] = "vit-b-32"
    normalize: bool = Field(True, description="store L2-normalised embeddings (false: the raw CLIP "
                            "projection, as SRDD's released clustering uses with cluster.method kmeans)")


class ComplexityConfig(_ActorStage):
    """ViT complexity scoring of every mined patch (TripleD step 1; ``srdistill.distill.complexity``).

    ``model`` is a transformers ViT-style checkpoint (``ViTModel``, DeiT, DINO, DINOv2: any
    ``AutoModel`` whose output has ``last_hidden_state`` with a leading CLS token) in a local
    directory, or a Hugging Face id (downloaded into the HF cache, or from the cache only with
    ``HF_HUB_OFFLINE=1``). Without weights the
    stage stops unless ``allow_random_init`` is set; ``random_init`` then picks the
    architecture and the scores measure a random ViT's features (no learned notion of
    complexity). ``image_size`` is the side patches are resized to (``None``: the model's own;
    another size interpolates the position embeddings).
    """

    model: str = "google/vit-base-patch16-224"
    allow_random_init: bool = False
    random_init: Literal["vit-s-16", "vit-ti-16", "tiny"] = "vit-s-16"
    image_size: int | None = Field(None, ge=8, description="patch side fed to the ViT; None: the model's")


class ClusterConfig(_Strict):
    """k-means of the embeddings (trained on a sample, all assigned). See ``srdistill.distill.clustering``.

    ``method``: ``spherical-faiss`` (default), faiss spherical k-means on L2-normalised
    embeddings. Centroids are trained on a seeded sample of at most ``max_train_points`` rows:
    by one spherical k-means (best of ``nredo`` runs of ``niter`` iterations), or for
    ``k >= two_level_min_k`` by two-level k-means (coarse ``round(sqrt(k))`` clusters, each
    split in proportion to its size). Every row is then assigned to its most similar
    centroid: exactly (``faiss.IndexFlatIP``) for ``k < ivf_min_k``, else through an inverted
    file (``faiss.IndexIVFFlat``, ``nprobe`` lists searched).

    ``kmeans``: SRDD's released clustering, ``sklearn.cluster.KMeans(n_clusters=k,
    init="k-means++", n_init=nredo, max_iter=niter, random_state=seed)`` (Euclidean) on the
    raw, not normalised, embeddings of the same seeded sample, every row then assigned to its
    Euclidean-nearest centroid (exact); ``two_level_min_k``, ``ivf_min_k`` and ``nprobe`` do
    not apply. The release's call is ``KMeans(n_clusters=7, random_state=42)`` on all
    patches: ``k=7, nredo=10, niter=300, seed=42`` with ``max_train_points`` >= the patch
    count reproduces it (sklearn's defaults before 1.4; from 1.4 its default ``n_init`` is 1).
    The rows are the embed stage's output as stored: raw only if that stage stores them raw.
    """

    method: Literal["spherical-faiss", "kmeans"] = "spherical-faiss"
    k: int = Field(7, ge=1)
    niter: int = Field(20, ge=1, description="k-means iterations per run (kmeans: max_iter)")
    # Lloyd's algorithm from one random init merged two of 7 well-separated clusters and split
    # another in 8 of 20 runs; the best of 5 restarts recovered them in 20 of 20.
    nredo: int = Field(5, ge=1, description="k-means restarts; the best objective is kept (kmeans: n_init)")
    seed: int = 0
    max_train_points: int = Field(100_000, ge=1)
    two_level_min_k: int = Field(
        1024, ge=2,
        description="k from which centroids are trained by two-level k-means (coarse "
        "round(sqrt(k)) clusters, each split in proportion to its size)",
    )  # fmt: skip
    ivf_min_k: int = Field(
        4096, ge=2,
        description="k from which points are assigned through an IVF index (approximate) "
        "instead of an exact flat inner-product search",
    )  # fmt: skip
    nprobe: int = Field(
        32, ge=1, description="IVF lists searched per point when k >= ivf_min_k (more: closer "
        "to exact, slower)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> "ClusterConfig":
        if self.max_train_points < self.k:
            raise ValueError(
                f"cluster.max_train_points {self.max_train_points} < cluster.k {self.k}: "
                "k-means needs at least k training points"
            )
        return self


class ProxyConfig(_Strict):
    """The proxy SR network of the ``proxy_error`` score (``srdistill.distill.proxy_error``, after EL2N).

    For each of ``seeds``, an ESPCN of ``n_feats`` channels at the run's scale is trained for
    ``steps`` Adam steps (L1, learning rate ``lr``) on ``batch_size`` random ``crop`` x ``crop``
    HR crops of the corpus' own patches (LR by MATLAB bicubic, as training makes it); every patch
    is then scored by the networks' mean squared error on it, averaged over the seeds. The
    defaults score 10,000 96x96 patches at x2 in about a minute on 2 CPU cores (see the module).
    """

    steps: int = Field(200, ge=1, description="Adam steps per proxy network")
    seeds: tuple[int, ...] = Field(
        (0, 1), min_length=1, description="one proxy network per seed (its initialisation and batches)")
    batch_size: int = Field(16, ge=1, description="HR crops per step")
    crop: int = Field(48, ge=4, description="HR crop side in pixels (rounded down to a multiple of the scale)")
    lr: float = Field(1e-3, gt=0.0)
    n_feats: int = Field(32, ge=2, description="ESPCN width: channels of its first layer")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SelectConfig(_Strict):
    """Budgeted selection of the distilled real set (coreset).

    Exactly one budget: ``ipc`` patches per cluster, or ``pixel_fraction`` of the corpus'
    HR pixels (all readable source images). ``method`` ``clip-kmeans`` ranks by ``score``
    inside each cluster; ``random`` and ``score-topk`` are the same-budget baselines;
    ``tripled``, ``kcenter``, ``typiclust``, ``stratified`` and ``hard-mix`` are described in
    ``srdistill.distill.selection``. Before any method, overlapping windows are thinned
    (``max_overlap``) so the budget is not spent on near-duplicate crops.
    """

    method: Literal["clip-kmeans", "random", "score-topk", "tripled", "kcenter", "typiclust", "stratified",
                    "hard-mix"] = "clip-kmeans"  # fmt: skip
    ipc: int | None = Field(None, ge=1)
    pixel_fraction: float | None = Field(None, gt=0.0, le=1.0)
    score: SelectScore = Field(
        "psnr_bic", description="hardness score: psnr_bic (lower is harder), grad or proxy_error (higher "
        "is harder; a column the caller attaches, srdistill.distill.proxy_error)")  # fmt: skip
    complexity_score: ComplexityScore = Field(
        "vit_complexity", description="tripled: the complexity score whose quantiles are the strata")
    strata: int = Field(
        8, ge=1, description="bins of a score: tripled, equal-count quantile bins of complexity_score (the "
        "budget shared in proportion to their sizes, and an IPC budget is ipc per stratum); stratified, "
        "equal-width bins of score (the budget shared by CCS's rule)",
    )  # fmt: skip
    features: Literal["descriptor", "clip", "vit"] = Field(
        "descriptor", description="kcenter's and typiclust's feature space: descriptor (pixel statistics, "
        "srdistill.distill.kcenter.patch_descriptors), clip (the embed stage's 'embedding' column) or vit "
        "(the complexity stage's 'feature' column)")  # fmt: skip
    prune_hard: float = Field(
        0.0, ge=0.0, lt=1.0, description="stratified: drop this fraction of the hardest candidates first (CCS's beta)")
    hard_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="hard-mix: share of the budget taken hardest first by score; "
        "the rest is uniform random from the other candidates")  # fmt: skip
    proxy: ProxyConfig = Field(ProxyConfig(), description="score proxy_error: the proxy network")
    max_overlap: float = Field(
        0.25, ge=0.0, le=1.0,
        description="drop a patch overlapping a harder one of the same image by more than this "
        "fraction of its area (1.0 keeps all)",
    )  # fmt: skip
    seed: int = 0

    @model_validator(mode="after")
    def _one_budget(self) -> "SelectConfig":
        if (self.ipc is None) == (self.pixel_fraction is None):
            raise ValueError("give exactly one budget: select.ipc or select.pixel_fraction")
        return self


Arch = Literal["edsr-baseline", "espcn", "rcan", "swinir-light", "mzsr"]


class AlignConfig(_Strict):
    """Feature-level distribution alignment of the selected set (TripleD step 3;
    ``srdistill.distill.alignment``).

    A small residual CNN (``blocks`` 3x3 convolutions of ``channels``, the last one
    zero-initialised so it starts as the identity) is trained on the selected images to
    minimise ``loss`` (``mmd``: squared MMD with a multi-bandwidth Gaussian kernel; ``moments``:
    squared distance of feature means and standard deviations) between their ViT features and
    a sample of ``corpus_features`` corpus features, plus ``fidelity_weight`` x L1 to the
    original pixels; the transformed images are the distilled set. ``enabled: false`` skips it.
    """

    enabled: bool = False
    loss: Literal["mmd", "moments"] = "mmd"
    channels: int = Field(32, ge=1)
    blocks: int = Field(3, ge=2, description="3x3 convolutions, ReLU between them")
    iterations: int = Field(200, ge=1)
    # MMD on a batch is a noisy estimate: with 16 of 39 images per step the CNN did not move on
    # the bench set; with all 39 it lowered the MMD by 18% (docs/RESULTS.md)
    batch_size: int = Field(64, ge=1, description="images per step: random crops of crop, or whole "
                            "images drawn without replacement when crop is None")  # fmt: skip
    crop: int | None = Field(None, ge=8, description="side of the training crops; None: whole images")
    lr: float = Field(1e-3, gt=0.0)
    # L1's constant gradient is a dead zone: at 1.0 and above the CNN stayed the identity on the
    # bench set (docs/RESULTS.md); 0.1 moved it by 0.5% of the pixel range (42.8 dB to the original)
    fidelity_weight: float = Field(0.1, ge=0.0, description="weight of the L1 fidelity term "
                                   "(images in [0, 1])")  # fmt: skip
    corpus_features: int = Field(4096, ge=2, description="corpus features sampled as the target")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class CurriculumConfig(_Strict):
    """Two-stage training schedule (TripleD step 4; ``srdistill.sr.curriculum``).

    Stage 1 (the first ``switch`` of the iterations) draws crops only from the ``easy_fraction``
    lowest-complexity images by ``score``. At the switch, the network's L1 loss is measured on
    every image; stage 2 draws from the remaining (complex) images plus the
    ``uncertain_fraction`` of the easy images with the highest loss. Each image's ``score``
    is read from the column of that name in its folder's ``provenance.csv`` (the ``tripled``
    selection writes all three); ``entropy`` and ``grad_energy`` are otherwise computed from
    the image, ``vit_complexity`` has to be there.
    """

    enabled: bool = False
    switch: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the iterations in stage 1")
    easy_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="share of the images in stage 1")
    uncertain_fraction: float = Field(0.25, ge=0.0, le=1.0, description="share of the easy images "
                                      "(highest loss at the switch) kept in stage 2")  # fmt: skip
    score: ComplexityScore = "grad_energy"


class TrainConfig(_Strict):
    """SR training: L1 loss, Adam, random crops + flips/rot90, LR made by MATLAB bicubic.

    ``batch_size`` is the global batch: with ``workers`` data-parallel Ray Train workers each
    takes ``batch_size // workers``, so the result does not depend on the worker count.
    Schedules: ``step`` halves the lr every ``lr_decay_every`` steps (constant if unset),
    ``multistep`` halves it at each of ``lr_milestones``, ``cosine`` anneals it to ``lr_min``;
    the lr never goes below ``lr_min``. ``amp`` autocasts the forward pass on CUDA only.
    ``RECIPES`` holds each network's published settings (``srdistill train --recipe``).
    """

    model: Arch = "espcn"
    model_kwargs: dict[str, int | float] = Field(
        default_factory=dict, description="constructor arguments of the network beyond scale, e.g. "
        "{n_resblocks: 4, n_feats: 32} for a slim EDSR (srdistill.sr.models)")  # fmt: skip
    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr_patch: int = Field(48, ge=4, description="LR crop side in pixels; HR crop = lr_patch*scale")
    lr: float = Field(2e-4, gt=0.0)
    schedule: Literal["step", "multistep", "cosine"] = "step"
    lr_decay_every: int | None = Field(None, ge=1, description="step: halve lr every N steps")
    lr_milestones: tuple[int, ...] = ()
    lr_min: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0, description="max global L2 norm of gradients")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="EMA of weights; saved model")
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = 0
    val_every: int | None = Field(None, ge=1, description="PSNR on val_dataset every N steps")
    val_dataset: str = "Set5"
    workers: int = Field(0, ge=0, description="Ray Train data-parallel workers; 0 = in-process")
    use_gpu: bool | None = Field(None, description=_USE_GPU_HELP)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    tensorboard: bool = Field(False, description="TensorBoard event files in <out>/tensorboard/ (needs tensorboard)")
    curriculum: CurriculumConfig = CurriculumConfig()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            raise ValueError(f"lr_milestones {list(self.lr_milestones)} must be increasing")
        if self.workers and self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} < workers {self.workers}")
        _check_gpu_flags(self, "train")
        return self


#: Each network's published training settings (paper / official code), as ``TrainConfig``
#: fields; ``load_config(..., recipe=True)`` (``srdistill train --recipe``) layers them between
#: the preset and the user's config file and overrides.
RECIPES: dict[str, dict] = {
    # EDSR (arXiv 1707.02921 §4.2, official code: 300 epochs x 1000 updates): 48x48 LR
    # patches, batch 16, Adam 1e-4 halved every 2e5 updates.
    "edsr-baseline": dict(lr_patch=48, batch_size=16, lr=1e-4, schedule="step",
                          lr_decay_every=200_000, iterations=300_000),
    # RCAN (arXiv 1807.02758 §4.1; official code: 1000 epochs x 1000 updates): as EDSR.
    "rcan": dict(lr_patch=48, batch_size=16, lr=1e-4, schedule="step",
                 lr_decay_every=200_000, iterations=1_000_000),
    # SwinIR lightweight (arXiv 2108.10257 §4.1, official options): 64x64 LR patches, batch
    # 64, Adam 2e-4 halved at 250k/400k/450k/475k of 500k iterations.
    "swinir-light": dict(lr_patch=64, batch_size=64, lr=2e-4, schedule="multistep",
                         lr_milestones=(250_000, 400_000, 450_000, 475_000), iterations=500_000),
    # MZSR large-scale pretraining (arXiv 2002.12213; released code Large-Scale_Training):
    # 96x96 HR (48x48 LR at x2), batch 32, Adam 4e-4 halved every 1e5 steps, floor 1e-4, 800k.
    "mzsr": dict(lr_patch=48, batch_size=32, lr=4e-4, schedule="step", lr_decay_every=100_000,
                 lr_min=1e-4, iterations=800_000),
    # ESPCN: ours (the paper trains on Y with a different loss); converges on a CPU in minutes.
    "espcn": dict(lr_patch=32, batch_size=16, lr=1e-3, schedule="cosine", iterations=20_000),
}  # fmt: skip


class MZSRConfig(_Strict):
    """MZSR's meta-transfer learning, its test-time adaptation, and the ZSSR baseline
    (``srdistill.zeroshot.mzsr``).

    MZSR: Soh, Cho, Cho, "Meta-Transfer Learning for Zero-Shot Super-Resolution", CVPR 2020,
    arXiv:2002.12213, official code JWSoh/MZSR (``config.py``, ``train.py``, ``test.py``,
    ``dataGenerator.py``). ZSSR: Shocher, Cohen, Irani, "Zero-Shot Super-Resolution using
    Deep Internal Learning", CVPR 2018, arXiv:1712.06087, official code assafshocher/ZSSR
    (``configs.py``, ``ZSSR.py``). Defaults are those releases' settings (``loss_weights``:
    uniform, as the released ``train.py`` trains); the source of each is in its field
    description. The large-scale bicubic pretraining that precedes the meta-transfer is
    ``training.train_sr`` with ``RECIPES["mzsr"]`` (``MZSRNet``'s MATLAB-bicubic input, as
    MZSR's), not part of this config. ``srdistill mzsr import-tf`` writes the released
    TensorFlow models with this config (``scale``, ``subsample`` and ``adapt_lr`` of each).

    A task is one random anisotropic Gaussian kernel (``degradation.random_kernel``); its
    support and query sets are ``support`` and ``query`` HR crops of ``hr_patch`` pixels whose LR
    (blur + subsampling) is bicubic-upsampled back to ``hr_patch`` before entering the network.
    ``workers``/``use_gpu`` are read only by the Ray Train runner; ``tasks_per_batch`` is the
    global meta-batch, split evenly across the workers.
    """

    scale: int = Field(2, ge=2, le=8, description="SR factor (MZSR's released models: x2, x4)")
    n_feats: int = Field(64, ge=1, description="hidden channels of MZSRNet (MZSR: 64); used "
                         "when no init checkpoint is given")  # fmt: skip
    n_layers: int = Field(8, ge=2, description="convolutions of MZSRNet (MZSR: 8)")
    # --- tasks (MZSR config.py / dataGenerator.py / gkernel.py)
    kernel_size: int = Field(15, ge=3, description="side of the random task kernels (MZSR: 15)")
    hr_patch: int = Field(64, ge=4, description="HR side of a support/query patch (MZSR: 64x64 "
                          "HR; the network sees the LR bicubic-upsampled back to this size)")  # fmt: skip
    tasks_per_batch: int = Field(5, ge=1, description="tasks per meta-update (META_BATCH_SIZE 5)")
    support: int = Field(8, ge=1, description="support patches per task (TASK_BATCH_SIZE 8)")
    query: int = Field(8, ge=1, description="query patches per task (TASK_BATCH_SIZE 8)")
    subsample: Literal["direct", "bicubic"] = Field(
        "direct", description="how a task's blurred HR is subsampled (MZSR's main models: direct)")
    noise_sigma: float = Field(0.0, ge=0.0, description="std of Gaussian noise added to the task "
                               "LR, in [0, 255] pixel units (MZSR: 0)")  # fmt: skip
    # --- inner loop (MZSR config.py)
    inner_steps: int = Field(5, ge=1, description="SGD steps on the support set (TASK_ITER 5)")
    inner_lr: float = Field(1e-2, gt=0.0, description="inner-loop SGD lr (TASK_LR 1e-2)")
    first_order: bool = Field(False, description="first-order MAML (no gradient through the inner "
                              "gradients); MZSR uses second order from step 0")  # fmt: skip
    # --- outer loop (MZSR config.py / train.py)
    meta_lr: float = Field(1e-4, gt=0.0, description="Adam lr of the meta-update (META_LR 1e-4)")
    meta_iterations: int = Field(100_000, ge=1, description="meta-updates (META_ITER 100000)")
    loss_weights: Literal["uniform", "annealed"] = Field(
        "uniform",
        description="weights of the query losses after each inner step (multi-step loss). "
        "uniform: 1/inner_steps each, for the whole run: what MZSR's released train.py trains with "
        "(get_loss_weights anneals from tf global_step, which nothing increments). annealed: MAML++'s "
        "schedule as that function is written, from uniform towards the last step over "
        "msl_anneal_iterations (ours, an option)",
    )  # fmt: skip
    msl_anneal_iterations: float = Field(
        10_000 / 3, ge=0.0,
        description="loss_weights=annealed: the per-inner-step query-loss weights go linearly "
        "from uniform to their final values over about this many meta-updates (MZSR "
        "train.py get_loss_weights: 10000/3); 0 = final weights from the start",
    )  # fmt: skip
    msl_min_weight: float = Field(
        0.03, ge=0.0, le=1.0,
        description="loss_weights=annealed: final weight of each non-last inner step is msl_min_weight "
        "/ inner_steps, the last step gets the rest (MZSR/MAML++: 0.03); 0 = plain MAML on the last step",
    )  # fmt: skip
    log_every: int = Field(100, ge=1, description="meta-updates per log.jsonl line (PRINT_ITER)")
    checkpoint_every: int = Field(2500, ge=1, description="meta-updates per last.safetensors "
                                  "(SAVE_ITER 2500)")  # fmt: skip
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(0, ge=0, description="Ray Train data-parallel workers; 0 = in-process")
    use_gpu: bool | None = Field(None, description=_USE_GPU_HELP)
    # --- test-time adaptation (MZSR test.py)
    adapt_steps: int = Field(10, ge=0, description="SGD steps on (I_son, LR) at test time "
                             "(MZSR(1) / MZSR(10))")  # fmt: skip
    adapt_lr: tuple[float, ...] = Field(
        (2e-2, 1e-2, 1e-2, 1e-2, 5e-3),
        description="lr of adaptation step i (the last value repeats): MZSR test.py for its "
        "direct-subsampling x2 model: 2e-2, then 1e-2 for steps 1-3, then 5e-3",
    )  # fmt: skip
    # --- ZSSR baseline (ZSSR configs.py)
    zssr_iterations: int = Field(3000, ge=1, description="max Adam steps (max_iters 3000)")
    zssr_min_iterations: int = Field(256, ge=0, description="steps between lr drops at least "
                                     "(min_iters 256)")  # fmt: skip
    zssr_lr: float = Field(1e-3, gt=0.0, description="initial Adam lr (learning_rate 1e-3)")
    zssr_min_lr: float = Field(9e-6, gt=0.0, description="stop once the lr falls below this "
                               "(min_learning_rate 9e-6)")  # fmt: skip
    zssr_crop: int = Field(128, ge=4, description="side of a father crop (crop_size 128)")
    zssr_init_variance: float = Field(0.1, gt=0.0, description="conv weights ~ N(0, v/fan_in), "
                                      "zero biases (init_variance 0.1)")  # fmt: skip
    zssr_dihedral_augment: bool = Field(True, description="random flips/rot90 of the fathers "
                                        "(ZSSR: on, off in its given-kernel config)")  # fmt: skip
    zssr_scale_augment: bool = Field(True, description="half of the fathers come from the LR "
                                     "image downscaled by U[zssr_min_scale, 1)")  # fmt: skip
    zssr_min_scale: float = Field(0.5, gt=0.0, le=1.0, description="augment_min_scale 0.5")
    zssr_ensemble: Literal["median", "mean", "none"] = Field(
        "median", description="geometric self-ensemble over the 8 flips/rot90 of the input, fused "
        "by the median (ZSSR output_flip) or mean; none = one pass")  # fmt: skip
    zssr_back_projection: int = Field(
        10, ge=0, description="back-projection iterations per ensemble member and on the fused "
        "result (ZSSR back_projection_iters: 10 default, 2 in its given-kernel config)")  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> "MZSRConfig":
        for name in ("hr_patch", "zssr_crop"):
            if getattr(self, name) % self.scale:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of scale {self.scale}")
        if not self.adapt_lr or min(self.adapt_lr) <= 0:
            raise ValueError(f"adapt_lr {list(self.adapt_lr)} must be one or more positive lrs")
        if self.zssr_min_lr >= self.zssr_lr:
            raise ValueError(f"zssr_min_lr {self.zssr_min_lr} must be below zssr_lr {self.zssr_lr}")
        if self.workers and self.tasks_per_batch % self.workers:
            raise ValueError(f"tasks_per_batch {self.tasks_per_batch} must be a multiple of "
                             f"workers {self.workers} (tasks are split evenly)")  # fmt: skip
        _check_gpu_flags(self, "mzsr")
        return self


class FinetuneConfig(_Strict):
    """Cluster-conditioned diffusion fine-tuning (SRDD §3.3; ``srdistill.distill.diffusion``).

    Backbones: ``dit`` is a diffusers ``DiTTransformer2DModel`` + ``AutoencoderKL`` loaded
    from ``dit_path`` (the layout of ``facebook/DiT-XL-2-512``: ``transformer/``, ``vae/``,
    ``scheduler/``) and ``vae_path`` (the layout of ``stabilityai/sd-vae-ft-ema``, overriding
    ``dit_path/vae``), each a local directory or a Hugging Face id (downloaded into the HF
    cache, or from the cache only with ``HF_HUB_OFFLINE=1``; ``diffusion.resolve_backbone``),
    fine-tuned with DiffFit; ``unet`` is a class-conditional pixel-space ``UNet2DModel``
    trained from scratch (no pretrained weights needed); ``auto`` takes
    ``dit`` when ``dit_path`` is set, else ``unet``. ``trainable`` ``auto`` means DiffFit for
    ``dit`` and all parameters for ``unet``.

    SRDD's settings (released code): AdamW lr 1e-3, global batch 4, EMA 0.9999, centre crop +
    flip, latents x 0.18215, 1000-step linear DDPM schedule, lambda_pos 0.002, lambda_neg 0.008,
    memory 64 per cluster. ``workers`` > 0 runs the loop on Ray Train under DeepSpeed (ZeRO
    ``zero_stage``); 0 runs it in-process in plain PyTorch.

    Choices where SRDD's released ``train_diff.py`` (on MinimaxDiffusion's DiT and improved-DDPM
    code) is one option (see ``srdistill.distill.diffusion``):

    * ``difffit``: ``first-half`` (released, and DiffFit's best placement): scales gamma on the
      q, k, v projections, the attention output (twice: projection and branch, as the release's
      two gammas) and the MLP branch of the first half of the blocks (14 of DiT-XL/2's 28);
      ``all-blocks`` (ours before): gamma on the attention and MLP branch of every block.
    * ``tie_embeddings``: all blocks share one class table and timestep embedder (released DiT:
      one ``y_embedder``/``t_embedder``); false trains diffusers' per-block copies apart.
    * ``class_init``: cluster rows start at the mean of the pretrained class rows (``mean``,
      ours) or at pretrained rows 0..k-1 (``imagenet-rows``, released: labels 0..k-1 of an
      unresized 1000-class table).
    * ``loss``: ``simple`` = L_simple (+ memory terms); ``hybrid`` (released) adds improved-DDPM's
      L_vb for the learned-variance channels (the ``unet`` backbone then gets them too).
    * ``ema_warmup``: decay min(``ema_decay``, (1 + s) / (10 + s)) at step s (ours); false =
      ``ema_decay`` from step 0 (released).
    * ``epochs``: when set, the length is ``epochs`` x (N // ``batch_size``) steps, N = all
      encoded patches (released: an epoch loop with ``drop_last``), replacing ``iterations``.
    * ``memory_reduce``: ``sample`` = each sample's min/max similarity, averaged (ours, the
      paper's per-sample form); ``cluster`` (released) = per cluster of the batch the min/max
      over all its (sample, memory) pairs, averaged over the clusters in the batch.
    * ``memory_labels``: memory terms by the conditioning label (``conditioning``: samples
      dropped to the null class get none, ours) or by cluster (``cluster``, released).
    """

    backbone: Literal["auto", "dit", "unet"] = "auto"
    dit_path: str | None = None
    vae_path: str | None = None
    resolution: int = Field(512, ge=8, description="side of a training crop / synthesized image")
    crop: Literal["center", "random"] = "center"
    flip: bool = True
    trainable: Literal["auto", "difffit", "full"] = "auto"
    unet_channels: tuple[int, ...] = (64, 128, 256)
    unet_attention: bool = Field(True, description="self-attention in the lowest UNet level")
    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(4, ge=1, description="global batch")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="label -> null rate (CFG)")
    lambda_pos: float = Field(0.002, ge=0.0)
    lambda_neg: float = Field(0.008, ge=0.0)
    memory_size: int = Field(64, ge=1, description="memory bank entries per cluster")
    latent_scale: float = Field(0.18215, gt=0.0)
    max_patches: int | None = Field(None, ge=1, description="cap on training patches (random)")
    encode_batch_size: int = Field(8, ge=1)
    seed: int = 0
    workers: int = Field(0, ge=0, description="Ray Train + DeepSpeed workers; 0 = in-process PyTorch")
    zero_stage: int = Field(2, ge=0, le=3)
    use_gpu: bool | None = Field(None, description=_USE_GPU_HELP)
    precision: Literal["bf16", "fp32"] = Field("bf16", description="on CUDA; a CPU runs fp32")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    tensorboard: bool = Field(False, description="TensorBoard event files in <out>/tensorboard/ (needs tensorboard)")
    difffit: Literal["first-half", "all-blocks"] = "first-half"
    tie_embeddings: bool = Field(True, description="one class table + timestep embedder for all DiT blocks")
    class_init: Literal["mean", "imagenet-rows"] = "mean"
    loss: Literal["simple", "hybrid"] = "simple"
    ema_warmup: bool = True
    epochs: float | None = Field(None, gt=0.0, description="length in epochs over all patches; replaces iterations")
    memory_reduce: Literal["sample", "cluster"] = "sample"
    memory_labels: Literal["conditioning", "cluster"] = "conditioning"

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.backbone == "dit" and not self.dit_path:
            raise ValueError("finetune.backbone 'dit' needs finetune.dit_path")
        if self.workers and self.batch_size < self.workers:
            raise ValueError(f"finetune.batch_size {self.batch_size} < workers {self.workers}")
        if self.resolved_backbone == "dit" and self.crop == "random":
            raise ValueError("finetune.crop 'random' needs the unet backbone: DiT latents are "
                             "encoded once from centre crops")  # fmt: skip
        _check_gpu_flags(self, "finetune")
        return self

    @property
    def vae_dir(self) -> Path | None:
        """The VAE directory of a ``dit`` config: ``vae_path``, else ``dit_path/vae``; a local
        path only once Hugging Face ids are resolved (``diffusion.resolve_backbone``)."""
        if self.vae_path:
            return Path(self.vae_path)
        return Path(self.dit_path) / "vae" if self.dit_path else None

    @property
    def resolved_backbone(self) -> str:
        """``dit`` or ``unet`` (``auto`` resolved)."""
        if self.backbone == "auto":
            return "dit" if self.dit_path else "unet"
        return self.backbone


class SynthConfig(_Strict):
    """Sampling the synthetic distilled set (SRDD §3.4; ``srdistill.distill.synthesis``).

    ``ipc`` images per cluster; without it the ``select`` budget (``ipc`` or
    ``pixel_fraction``) decides. ``guidance_scale`` is classifier-free guidance (1 = none).
    ``sampler``: ``ddim`` (eta 0, trailing timesteps; our default), ``dpm-solver++``
    (2nd-order multistep) or ``ddpm`` (SRDD's released sampler: ancestral DDPM on ``steps``
    timesteps respaced as improved-DDPM's ``space_timesteps``, with the model's learned
    variance when it has one, else beta~). ``guidance_channels`` N guides only the first N
    noise channels and takes the others from the conditional prediction (None = all, ours; 3 =
    DiT's and SRDD's released ``forward_with_cfg``). ``vae_path`` is a separate decoder VAE
    (local directory or Hugging Face id, resolved like ``finetune.vae_path``; ``dit`` only): SRDD
    trains with ``stabilityai/sd-vae-ft-ema`` and decodes with ``stabilityai/sd-vae-ft-mse``;
    None decodes with the training VAE. Image ``i`` of cluster ``c`` uses the noise of seed
    ``(seed, c, i)``, so a rerun reproduces it.
    """

    sampler: Literal["ddim", "dpm-solver++", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(4.0, ge=1.0)
    guidance_channels: int | None = Field(None, ge=1, description="guide the first N noise channels (None: all)")
    vae_path: str | None = Field(None, description="decoder VAE (dir or HF id); None: the training VAE")
    ipc: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    num_actors: int = Field(1, ge=1, description="Ray Data sampling actors (actor_num_gpus each on GPUs)")
    actor_num_cpus: float = Field(1.0, gt=0.0)
    actor_num_gpus: float = Field(1.0, gt=0.0, description="GPUs per actor when sampling runs on GPUs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


class EvalConfig(_Strict):
    """Evaluation datasets: HR folders or benchmark names (Set5, Set14, B100, ...).

    Names are looked up as ``<root>/<name>/HR`` under ``$SRDISTILL_DATA`` (``os.pathsep``-separated),
    the user cache (``~/.cache/srdistill/datasets``, filled by ``srdistill data get NAME``) and the
    repository's ``data/`` (``srdistill.datasets.data_roots``). ``device`` ``auto`` runs the evaluation
    as a Ray task with one GPU when the cluster has GPUs, else in the driver on CPU; ``cuda``
    needs GPUs in the cluster (not on the head); ``cpu`` runs it in the driver.
    """

    datasets: tuple[str, ...] = ("Set5", "Set14", "B100")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RayConfig(_Strict):
    """Embedded default: a local Ray started in-process (``address="local"``: never a cluster
    that a ``ray start`` on this machine left running). ``address`` (or ``$RAY_ADDRESS``, as
    ``ray job submit`` sets) joins a running cluster instead.

    ``num_gpus``: for a local Ray, the GPUs it gets (None: all it detects); for a joined
    cluster, the GPUs placement counts on (None: those ``ray.cluster_resources()`` shows now;
    give the autoscaled total so that stages still ask for GPUs while GPU nodes are scaled to
    zero). 0 runs every stage on CPU.
    """

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)


#: Options added after runs existed, at the value that reproduces what the stage did before they
#: did: left out of the stage's fingerprint, so an upgrade does not redo finished stages.
_NEUTRAL = {
    "mine": {"psnr_bic_resize": "matlab"},
    "embed": {"normalize": True},
    "cluster": {"method": "spherical-faiss"},
    "select": {"features": "descriptor", "prune_hard": 0.0, "hard_fraction": 0.5,
               "proxy": ProxyConfig().model_dump(mode="json")},
    "synthesize": {"guidance_channels": None, "vae_path": None},
    "train": {"model_kwargs": {}},
}
_ENCODE_FIELDS = {"backbone", "dit_path", "vae_path", "resolution", "max_patches", "seed"}


class RunConfig(_Strict):
    """The whole main job: mine -> embed -> cluster -> select (``distill: coreset``) or
    encode -> finetune -> synthesize (``distill: synth``) -> train -> evaluate -> report."""

    scale: int = Field(2, ge=2, le=8, description="SR scale of train/evaluate")
    distill: Literal["coreset", "synth"] = Field(
        "coreset", description="coreset: train on selected real patches; synth: on SRDD's "
        "synthesized images (finetune + synthesize)")  # fmt: skip
    mine: MineConfig = MineConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    complexity: ComplexityConfig = ComplexityConfig()
    select: SelectConfig = SelectConfig(ipc=10)
    align: AlignConfig = AlignConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    synthesize: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()

    def stage_json(self, stage: str) -> str:
        """Canonical JSON of the config a stage depends on (used in its fingerprint)."""
        if stage == "encode":  # what the stored samples depend on
            part = self.finetune.model_dump(mode="json", include=_ENCODE_FIELDS)
            part["patch_size"] = self.mine.patch_size
        else:
            part = getattr(self, stage).model_dump(mode="json")
        if stage == "train" and not self.train.curriculum.enabled:
            del part["curriculum"]  # off trains exactly as before the option existed
        neutral = _NEUTRAL.get(stage, {})  # at these values a stage runs as before the option existed
        part = {k: v for k, v in part.items() if k not in neutral or v != neutral[k]}
        if stage in ("train", "evaluate"):
            part = {"scale": self.scale, **part}
        return json.dumps(part, sort_keys=True)
