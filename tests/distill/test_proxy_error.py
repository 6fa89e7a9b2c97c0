"""proxy_error (after EL2N): proxy ESPCNs trained briefly on real patches score them; the score
ranks like the mined hardness, is seeded, and ranks ``select_patches`` as ``select.score``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import spearmanr

from srdistill.config import ProxyConfig, SelectConfig
from srdistill.distill.proxy_error import attach_proxy_error, proxy_error_scores
from srdistill.distill.selection import select_patches
from srdistill.sr import imaging

from test_kcenter import t91_patches

#: Brief enough for a test (about a second on one CPU thread).
QUICK = ProxyConfig(steps=40, seeds=(0,), batch_size=8, crop=24, device="cpu")


def test_textured_patches_score_higher_than_flat_ones(tmp_path):
    flat = tmp_path / "flat.png"
    imaging.write_png(flat, np.full((64, 64, 3), (90, 140, 60), np.uint8))
    texture = t91_patches(n_images=2)
    n = texture.num_rows
    table = pa.table({"source": [str(flat)] * 4 + texture.column("source").to_pylist(),
                      "x": [0, 32, 0, 32] + texture.column("x").to_pylist(),
                      "y": [0, 0, 32, 32] + texture.column("y").to_pylist(),
                      "size": [32] * (4 + n)})  # fmt: skip
    scores = proxy_error_scores(table, 2, QUICK)
    assert scores.shape == (4 + n,) and scores.dtype == np.float32 and (scores >= 0).all()
    assert scores[:4].max() < 1e-4 < np.median(scores[4:])
    # on real patches the error ranks as the bicubic error does (lower psnr_bic = larger error)
    rho = spearmanr(scores[4:], texture.column("psnr_bic").to_numpy()).statistic
    assert rho < -0.7, rho


def test_seeded_order_free_and_averaged_over_seeds():
    table = t91_patches(n_images=2)
    a = proxy_error_scores(table, 2, QUICK)
    np.testing.assert_allclose(proxy_error_scores(table, 2, QUICK), a, rtol=1e-5)
    perm = np.random.default_rng(0).permutation(table.num_rows)
    np.testing.assert_allclose(proxy_error_scores(table.take(pa.array(perm)), 2, QUICK), a[perm], rtol=1e-4)
    b = proxy_error_scores(table, 2, QUICK.model_copy(update={"seeds": (1,)}))
    assert not np.allclose(a, b, rtol=1e-3)
    # two seeds: the mean of the two networks' errors (the crop pool is drawn with the first seed)
    both = proxy_error_scores(table, 2, QUICK.model_copy(update={"seeds": (0, 1)}))
    assert np.corrcoef(both, a)[0, 1] > 0.9 and not np.allclose(both, a, rtol=1e-3)
    # x3: the patches are cropped to a multiple of 3 and scored
    assert np.isfinite(proxy_error_scores(table.slice(0, 5), 3, QUICK)).all()


def test_errors_name_the_input():
    table = t91_patches(n_images=1)
    with pytest.raises(ValueError, match="size"):
        proxy_error_scores(table.drop_columns(["size"]), 2, QUICK)
    with pytest.raises(ValueError, match="size 16 are too small for scale 8"):
        proxy_error_scores(t91_patches(n_images=1, size=16), 8, QUICK)
    assert proxy_error_scores(table.slice(0, 0), 2, QUICK).shape == (0,)
    with pytest.raises(ValueError, match="attach_proxy_error"):
        attach_proxy_error(table, np.zeros(table.num_rows + 1))
    with pytest.raises(ValueError, match="attach_proxy_error"):
        attach_proxy_error(table, np.full(table.num_rows, np.nan))
    with pytest.raises(ValueError, match="proxy_error"):
        select_patches(table, SelectConfig(method="score-topk", score="proxy_error", ipc=1), n_total=3)


def test_selection_ranks_by_proxy_error():
    table = t91_patches(n_images=2)
    scores = proxy_error_scores(table, 2, QUICK)
    scored = attach_proxy_error(table, scores)
    assert scored.column("proxy_error").type == pa.float32()
    assert attach_proxy_error(scored, scores).column_names == scored.column_names  # replaced
    cfg = SelectConfig(method="score-topk", score="proxy_error", ipc=1, max_overlap=1.0)
    top = select_patches(scored, cfg, n_total=5)
    np.testing.assert_allclose(top.column("score").to_numpy(), np.sort(scores)[::-1][:5])  # higher is harder
    mix = select_patches(scored, cfg.model_copy(update={"method": "hard-mix"}), n_total=10)
    hard = mix.filter(pa.compute.equal(mix.column("cluster"), 0))
    np.testing.assert_allclose(hard.column("score").to_numpy(), np.sort(scores)[::-1][:5])
