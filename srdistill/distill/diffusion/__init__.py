"""SRDD's cluster-conditioned diffusion fine-tuning (Cho et al., arXiv 2509.14777, §3.3).

The "classes" of a class-conditional diffusion model are the CLIP k-means clusters of the
mined patches. Two backbones, both diffusers classes:

* ``dit``: ``DiTTransformer2DModel`` (Peebles & Xie, arXiv 2212.09748) in the latent space of
  an ``AutoencoderKL`` (latents x 0.18215), loaded from a local directory or a Hugging Face id
  in the layout of ``facebook/DiT-XL-2-512`` (and optionally a VAE such as
  ``stabilityai/sd-vae-ft-ema``); ids are downloaded into the Hugging Face cache, or with
  ``HF_HUB_OFFLINE=1`` looked up there only (``resolve_backbone``, once on the driver: actors
  get the local directories). diffusers gives every block its own copy of the class table and
  timestep embedder (the original DiT has one of each); with ``tie_embeddings`` all blocks
  share block 0's, as in the original (``tie_block_embeddings``). The class table is resized to
  ``k`` clusters + the null class of classifier-free guidance (``resize_class_embedding``:
  cluster rows from the mean of the pretrained rows, or from pretrained rows 0..k-1 as SRDD's
  release, which keeps the 1000-class table and labels clusters 0..k-1). It is fine-tuned with
  DiffFit (Xie et al., arXiv 2304.06648; ``apply_difffit``): only biases, norm parameters, the
  class table and per-channel scales ``gamma`` (initialised to 1, so the model starts
  unchanged) train; every other weight stays bit-identical. ``first-half`` places gamma as
  SRDD's released DiT (MinimaxDiffusion ``models.py``): on the q, k, v projections, twice on
  the attention output and on the MLP branch of the first half of the blocks;
  ``all-blocks`` on the attention and MLP branch of every block.
* ``unet``: a class-conditional pixel-space ``UNet2DModel`` trained from scratch (all
  parameters): the backbone without pretrained weights, so the whole SRDD path runs on a CPU
  with no download. With ``loss: hybrid`` it gets learned-variance output channels like DiT.

The loss (``srdd_loss``) is the diffusion loss plus SRDD's two memory-bank terms on the
predicted clean sample x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t), with a FIFO memory
of ``memory_size`` real samples and of as many (detached) predictions per cluster::

    L = L_diff + lambda_pos * (1 - min_j cos(x0_hat, real_j)) + lambda_neg * max_j cos(x0_hat, pred_j)

L_diff is the DDPM noise-prediction loss L_simple (Ho et al. 2020, Eq. 14; ``loss: simple``),
or, as SRDD's released code (improved-DDPM's ``GaussianDiffusion`` with DiT's learned
variance), the hybrid loss of Nichol & Dhariwal (arXiv 2102.09672, Eq. 16; ``loss: hybrid``):
L_simple + L_t, where L_t is the variational-bound term of the sampled timestep: the KL
between the true posterior q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t), whose log
variance interpolates between log beta_t and log beta~_t (Eq. 15), averaged over dimensions
in bits, with the predicted mean held fixed (stop-gradient: it trains only the variance
channels); at t = 0 the discretised Gaussian decoder NLL (``vb_bits``). Weight 1 on L_t is
the paper's lambda = 0.001 on L_vb = T E_t[L_t] at T = 1000. The memory terms reduce per sample (``memory_reduce: sample``) or, as the
release, per cluster of the batch (``cluster``: min/max over all its (sample, memory)
pairs, averaged over the clusters in the batch). The release also subtracts an MSE between
the latents and their bicubic round trip; it does not depend on the model (no gradient), so
it is left out.

``finetune`` is the whole loop, in plain PyTorch or under DeepSpeed (ZeRO 0-3) when the runner
(Ray Train) hands it a data-parallel context; ``encode_patches`` is the per-batch function of
the one-time encoding stage (VAE latent moments of the centre crop and of its mirror image).

The parts: ``backbone`` (resolution, loading, DiffFit, saving), ``encoding`` (the encode stage
and the encoded set), ``losses`` (``srdd_loss`` and its terms), ``finetuning`` (the loop); their
public names are re-exported here.
"""

from srdistill.distill.diffusion.backbone import (DEFAULT_SCHEDULE, DIFFFIT_PLACEMENTS, MODEL_FILE, WEIGHTS_FILE,
                                                  Backbone, MissingBackboneError, apply_difffit, build_backbone,
                                                  build_unet, check_backbone, load_dit, load_finetuned, load_vae,
                                                  make_dit_backbone, resize_class_embedding, resolve_backbone,
                                                  save_finetuned, tie_block_embeddings)
from srdistill.distill.diffusion.encoding import (ENCODED_SCHEMA, EncodedSet, PatchEncoder, encode_patches,
                                                  encoded_spec, load_encoded)
from srdistill.distill.diffusion.finetuning import DiffusionParallel, ema_decay, finetune, total_iterations
from srdistill.distill.diffusion.losses import (MemoryBank, approx_standard_normal_cdf,
                                                discretized_gaussian_log_likelihood, normal_kl, posterior_tables,
                                                q_posterior, srdd_loss, vb_bits)

__all__ = [
    "Backbone",
    "DiffusionParallel",
    "EncodedSet",
    "MissingBackboneError",
    "apply_difffit",
    "approx_standard_normal_cdf",
    "build_backbone",
    "build_unet",
    "check_backbone",
    "discretized_gaussian_log_likelihood",
    "ema_decay",
    "encode_patches",
    "encoded_spec",
    "PatchEncoder",
    "load_vae",
    "finetune",
    "load_dit",
    "make_dit_backbone",
    "load_encoded",
    "load_finetuned",
    "normal_kl",
    "posterior_tables",
    "q_posterior",
    "resize_class_embedding",
    "resolve_backbone",
    "save_finetuned",
    "srdd_loss",
    "tie_block_embeddings",
    "total_iterations",
    "vb_bits",
    "MemoryBank",
    "DEFAULT_SCHEDULE",
    "DIFFFIT_PLACEMENTS",
    "ENCODED_SCHEMA",
    "MODEL_FILE",
    "WEIGHTS_FILE",
]
