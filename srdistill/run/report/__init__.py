"""The report of a run directory: markdown with PNG figures, and one self-contained HTML file.

``write_report(run_dir, run_uri)`` reads what the pipeline left in ``run_dir`` (see
``docs/ARCHITECTURE.md``: ``manifest.json``, ``config.yaml``, ``select/selected.parquet``,
``train/log.jsonl``, ``train/model.safetensors``, ``evaluate/results.json``; for a ``distill:
synth`` run ``finetune/model/backbone.json``, ``finetune/log.jsonl`` and ``synthesize/``) and the
partitioned tables at ``run_uri`` (a local path or ``s3://`` URI, by default ``run_dir`` itself):
the patch table ``mine/patches/`` with its keep rule ``mine/keep.json`` (read through
``mining.read_patches``) and the cluster assignments ``cluster/assignments/``
(``storage.read_dataset``), of which only the columns (and for lookups the rows) needed are
read. It writes ``run_dir/report/report.md`` with its figures beside it, and
``run_dir/report/report.html``: the same sections with the figures embedded as ``data:`` URIs
(one file to send or open anywhere):

* ``crops_<set>.png``, one per evaluation set: for the ``CROPS_PER_SET`` images where the model's
  PSNR differs most from bicubic's (either way), the whole HR image with the crop marked, then
  the HR, bicubic and model crops at the same place: the ``CROP`` x ``CROP`` HR-pixel window of
  largest mean |model - bicubic|. The model (``train/model.safetensors``) runs on those images
  only, under the evaluation protocol (``imaging.modcrop``, MATLAB-bicubic LR);
* ``curves.png``: the SR training loss and, where ``train.val_every`` was set, the validation
  PSNR against the step (``train/log.jsonl``), with the bicubic PSNR of the validation set;
* ``scores.png``: histograms of ``psnr_bic`` and ``grad``, all patches vs kept patches, with
  the keep threshold when the keep rule is ``threshold``;
* ``clusters.png`` (coreset runs): one row per cluster, ``SELECTION_PER_SIDE`` random members
  of the cluster beside its first selected patches in rank order, each captioned with its
  selection score and source image;
* ``synthesis.png`` (synth runs): one row per cluster, its 4 real patches closest to the
  centroid (highest ``cos_sim``), a gap, then its first 4 synthesized images;
* ``finetune_loss.png`` (synth runs): the diffusion fine-tuning loss against the step.

Tables: the stages (state ``done``, ``skipped (up to date)``, ``disabled`` or ``not reached``,
and a few short count columns; the full counts stay in the manifest), the mean PSNR/SSIM per
set and the per-image PSNR/SSIM of every set (``evaluate/results.json``).

Every section after the header is optional: a run stopped after mining still gets a report
with the sections whose artifacts exist, and a line saying which stage is missing for the
others. Nothing here imports Ray; plots use matplotlib's Agg backend (no display).

The parts: ``sections`` (the markdown sections and ``write_report``), ``figures`` (matplotlib),
``html_page`` (``markdown_to_html``) and ``artifacts`` (reading the run directory).
"""

import matplotlib

matplotlib.use("Agg")  # before any part imports pyplot: figures are files, there is no display

from srdistill.run.report.html_page import markdown_to_html  # noqa: E402
from srdistill.run.report.sections import write_report  # noqa: E402

__all__ = [
    "write_report",
    "markdown_to_html",
]
