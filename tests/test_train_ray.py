"""Data-parallel SR training on a real local Ray (Ray Train ``TorchTrainer``, gloo on CPU)."""

from __future__ import annotations

import json

import pytest

from conftest import T91
from srdistill import runner
from srdistill.config import TrainConfig
from srdistill.training import load_checkpoint

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
    assert [r["step"] for r in log] == list(range(1, 10))
    assert load_checkpoint(out / "model.safetensors")[1]["step"] == 9
