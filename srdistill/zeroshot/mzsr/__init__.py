"""MZSR: meta-transfer learning for zero-shot SR, its test-time adaptation, and the ZSSR baseline.

Papers:

* MZSR: Soh, Cho, Cho, "Meta-Transfer Learning for Zero-Shot Super-Resolution", CVPR 2020,
  arXiv:2002.12213; official TensorFlow code JWSoh/MZSR.
* ZSSR: Shocher, Cohen, Irani, "'Zero-Shot' Super-Resolution using Deep Internal Learning",
  CVPR 2018, arXiv:1712.06087; official code assafshocher/ZSSR.
* The multi-step loss MZSR uses is MAML++'s: Antoniou, Edwards, Storkey, "How to train your
  MAML", ICLR 2019, arXiv:1810.09502. MAML: Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400.

The three MZSR stages::

    from srdistill.config import MZSRConfig, TrainConfig, RECIPES
    from srdistill.sr.training import train_sr, load_checkpoint
    from srdistill.zeroshot import mzsr
    # 1. large-scale bicubic pretraining: plain SR training (not in this module)
    pre = train_sr(TrainConfig(model="mzsr", **RECIPES["mzsr"]), 2, hr_files, Path("runs/pre"))
    # 2. meta-transfer learning over random-kernel tasks
    meta = mzsr.meta_train(MZSRConfig(), hr_files, Path("runs/meta"), init=pre)
    # 3. per test image: a few SGD steps on (I_son, LR), then super-resolve
    model, _ = load_checkpoint(meta)
    adapted = mzsr.adapt(model, lr_img, kernel, 2, steps=10, lr=MZSRConfig().adapt_lr)
    sr = mzsr.super_resolve(adapted, lr_img, 2)          # (2h, 2w, 3) uint8

and the baseline ``sr, info = mzsr.zssr(lr_img, kernel, 2, MZSRConfig())``.

One input convention everywhere in MZSR (pretraining, meta-training, adaptation,
super-resolution, ZSSR), the official code's: the LR image, as floats in [0, 1], is upsampled
to the HR size by MATLAB bicubic (``imaging.imresize``, no rounding) and fed to
``MZSRNet.forward_upsampled`` (``x + body(x)``). The pretraining (``train_sr``, which calls
``MZSRNet.forward``) gets the same input: ``MZSRNet(upsample="matlab")``, the default, does
that upsampling inside ``forward`` (as MZSR's ``Large-Scale_Training/train.py`` feeds
``imresize(lr, scale, kernel='cubic')``); the pretraining LR are MATLAB-bicubic downscaled and
rounded to uint8, as the DIV2K bicubic LR the release trains on. An MZSR model is evaluated
with ``super_resolve`` (numpy float64 upsampling), which ``model(lr)`` equals up to float32
rounding. Through this path a zero residual gives the paper's bicubic baseline (Set5, g20 x2:
28.74 dB; paper 28.73).

The released TensorFlow models (``Model/Directx2``, ``Directx4``, ``Bicubicx2``,
``Multi-scale``, and the pretrained ``Pretrained/Pretrained``) are converted by ``import_tf``
(``srdistill mzsr import-tf``) into checkpoints that load as ours, with the settings each was
released with (``RELEASED_TF``: scale, subsampling, test-time learning rates of ``test.py``).

LR images made here (task LR, test-time sons, ZSSR sons, back-projection) are floats in [0, 1]
(``degradation.degrade_float``), as MZSR and ZSSR keep them; rounded, they are ``degrade``'s
output bit for bit.
Test-time adaptation trains on the whole LR image, as MZSR ``test.py``.

What differs from the papers / official code:

* The HR task patches are random crops of the given images with a random flip/rot90 (the
  official code reads pre-cut 64x64 patches from a TFRecord).
* Multi-step loss: ``MZSRConfig.loss_weights`` ``uniform`` (default) is what the release
  trains with: its ``train.py`` builds MAML++'s annealed weights from ``global_step`` but never
  increments that variable (``apply_gradients`` gets no ``global_step``), so they stay at their
  step-0 values, uniform (1/5 each), for a fresh run (a run resumed with ``--step S`` keeps the
  weights of step S instead). ``annealed`` is that schedule as written (``loss_weights``).
  The weighted query loss is a sum (weights sum to 1) where the official code takes a mean over
  the inner steps (a constant 1/5 factor that Adam cancels up to its eps).
* The pretraining (``train_sr``) draws random HR crops (96x96 at x2 with ``RECIPES["mzsr"]``)
  with a random flip/rot90; the release cuts 96x96 patches on a stride-120 grid of DIV2K and
  keeps those whose mean squared gradient is at least e^-6 (JWSoh/MainSR
  ``generate_TFRecord.py``), without flips.
* Adam's state, the step and the task sampler's RNG are checkpointed, so a run resumes exactly.
* ZSSR's augmentation here is: a random crop (``zssr_crop``), with probability 1/2 taken from
  the image downscaled by ``U[zssr_min_scale, 1)`` (MATLAB bicubic), and a random flip/rot90.
  The official code draws, with probabilities 0.05 / 0.45 / 0.5, an untouched crop, a
  flip/rot90 crop, or an affine warp (random scale, arbitrary rotation, shear; OpenCV bicubic);
  arbitrary rotations and shears are left out. The network is MZSRNet with ZSSR's
  initialisation (conv weights ~ N(0, 0.1/fan_in)); ZSSR's convolutions have no biases, these
  have zero-initialised ones. Kernels are applied as given (ZSSR recentres a given kernel on its
  centre of mass; MZSR's g20 protocol, which ``degradation`` reproduces, does not). Flipping or
  rotating the image also flips/rotates its kernel: for kernels without those symmetries ZSSR's
  given-kernel config turns the flip/rot90 augmentation and the self-ensemble off
  (``zssr_dihedral_augment=False``, ``zssr_ensemble="none"``, ``zssr_back_projection=2``);
  the defaults here are its default (ideal-case) config, right for the isotropic g20 kernel.

The parts: ``inputs`` (the input convention and shared helpers), ``meta_training``,
``adaptation`` (test time), ``zssr_baseline`` and ``released`` (``import_tf``); their public
names are re-exported here.
"""

from srdistill.zeroshot.mzsr.adaptation import adapt, son_pair, super_resolve, zero_shot
from srdistill.zeroshot.mzsr.inputs import dihedral, undo_dihedral, upsample
from srdistill.zeroshot.mzsr.meta_training import loss_weights, meta_backward, meta_step, meta_train, sample_task
from srdistill.zeroshot.mzsr.released import RELEASED_TF, import_tf
from srdistill.zeroshot.mzsr.zssr_baseline import zssr

__all__ = [
    "RELEASED_TF",
    "adapt",
    "dihedral",
    "import_tf",
    "loss_weights",
    "meta_backward",
    "meta_step",
    "meta_train",
    "sample_task",
    "son_pair",
    "super_resolve",
    "undo_dihedral",
    "upsample",
    "zero_shot",
    "zssr",
]
