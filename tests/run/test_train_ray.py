"""Data-parallel SR training on a real local Ray (Ray Train ``TorchTrainer``, gloo on CPU)."""

from __future__ import annotations

import json

import pytest

from conftest import T91
from srdistill.config import TrainConfig
from srdistill.run import runner
from srdistill.sr.training import load_checkpoint

pytestmark = pytest.mark.slow


def test_two_worker_ray_train_completes_and_resumes(tmp_path, ray_local):
    images = sorted(T91.glob("*.png"))[:6]
    cfg = dict(model="espcn", batch_size=8, lr_patch=16, lr=1e-3, workers=2, log_every=1, checkpoint_every=3)
    out = tmp_path / "train"
    path = runner.train_ray(TrainConfig(iterations=6, **cfg), 2, images, out)
    model, meta = load_checkpoint(path)
    assert meta["step"] == 6 and model.scale == 2
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]

    # the same call with more iterations continues from the reported checkpoint (step 6)
    runner.train_ray(TrainConfig(iterations=9, **cfg), 2, images, out)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "resumed_from_step" not in r] == list(range(1, 10))
    assert [r["resumed_from_step"] for r in log if "resumed_from_step" in r] == [6]
    assert load_checkpoint(out / "model.safetensors")[1]["step"] == 9


def test_two_worker_mzsr_meta_training_on_ray_train(tmp_path, ray_local):
    """MZSR's meta-transfer learning data-parallel: each of 2 workers takes one of the 2 tasks
    of a meta-batch; the meta-gradients are all-reduced; a rerun with more steps resumes."""
    from srdistill.config import MZSRConfig

    images = sorted(T91.glob("*.png"))[:4]
    cfg = dict(n_feats=8, hr_patch=16, tasks_per_batch=2, support=2, query=2, inner_steps=1, workers=2,
               log_every=1, checkpoint_every=2)  # fmt: skip
    out = tmp_path / "meta"
    path = runner.meta_train_ray(MZSRConfig(meta_iterations=2, **cfg), images, out)
    model, meta = load_checkpoint(path)
    assert meta["arch"] == "mzsr" and meta["step"] == 2 and meta["mzsr_config"]["workers"] == 2
    runner.meta_train_ray(MZSRConfig(meta_iterations=4, **cfg), images, out)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "resumed_from_step" not in r] == [1, 2, 3, 4]
    assert [r["resumed_from_step"] for r in log if "resumed_from_step" in r] == [2]
