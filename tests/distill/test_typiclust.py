"""TypiClust (Hacohen et al., ICML 2022): typicality against brute force, one typical pick per
k-means cluster, the largest clusters first, and the ``typiclust`` selection method on real
patches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from srdistill.config import SelectConfig
from srdistill.distill.kcenter import attach_descriptors, patch_descriptors
from srdistill.distill.selection import select_patches
from srdistill.distill.typiclust import typicality, typiclust_select

from test_kcenter import t91_patches


def _blobs(sizes, dim=8, spread=20.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = spread * rng.standard_normal((len(sizes), dim))
    blob = np.repeat(np.arange(len(sizes)), sizes)
    return centres[blob] + rng.standard_normal((len(blob), dim)), blob, centres


def test_typicality_is_the_inverse_mean_distance_to_the_k_nearest():
    x = np.random.default_rng(1).standard_normal((40, 3))
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    for knn in (1, 5, 39, 100):
        k = min(knn, 39)
        brute = 1.0 / np.sort(d, axis=1)[:, 1 : k + 1].mean(axis=1)
        np.testing.assert_allclose(typicality(x, knn), brute, rtol=1e-4)
    outlier = np.vstack([x, [[30.0, 30.0, 30.0]]])
    assert np.argmin(typicality(outlier, 5)) == 40  # the far point is the least typical
    assert typicality(x[:1], 20).tolist() == [np.inf]
    with pytest.raises(ValueError, match="knn"):
        typicality(x, 0)


def test_one_typical_pick_per_cluster_largest_first():
    sizes = [200, 90, 40, 12]
    x, blob, centres = _blobs(sizes)
    for seed in range(3):
        picks = typiclust_select(x, len(sizes), seed=seed)
        assert blob[picks].tolist() == [0, 1, 2, 3], seed  # every blob once, the largest first
        for p in picks:  # the pick is its blob's most typical point, near the blob's centre
            members = np.flatnonzero(blob == blob[p])
            assert p == members[np.argmax(typicality(x[members]))]
            radius = np.linalg.norm(x[members] - centres[blob[p]], axis=1)
            assert np.linalg.norm(x[p] - centres[blob[p]]) < np.median(radius)
    # a cluster smaller than min_cluster_size comes after the others
    x, blob, _ = _blobs([3, 200, 90])
    assert blob[typiclust_select(x, 3, seed=0)].tolist() == [1, 2, 0]


def test_edge_cases_and_errors():
    x = np.zeros((6, 2), np.float32)  # all equal: k-means leaves clusters empty, the budget is still filled
    picks = typiclust_select(x, 4, seed=0)
    assert len(set(picks.tolist())) == 4
    assert sorted(typiclust_select(x, 9, seed=0).tolist()) == list(range(6))
    assert typiclust_select(x, 0, seed=0).shape == (0,)
    with pytest.raises(ValueError, match="not finite"):
        typiclust_select(np.array([[0.0], [np.nan]]), 1, seed=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        typiclust_select(np.zeros(4), 1, seed=0)
    with pytest.raises(ValueError, match="m must be"):
        typiclust_select(x, -1, seed=0)


TC = dict(method="typiclust", ipc=1, max_overlap=1.0)


def test_typiclust_selection_on_descriptors():
    table = t91_patches()
    out = select_patches(table, SelectConfig(**TC), n_total=12)
    assert out.num_rows == 12 and len(set(out.column("patch_id").to_pylist())) == 12
    assert out.column("rank").to_pylist() == list(range(12))
    shuffled = table.take(pa.array(np.random.default_rng(3).permutation(table.num_rows)))
    assert out.equals(select_patches(shuffled, SelectConfig(**TC), n_total=12))
    same = select_patches(attach_descriptors(table), SelectConfig(**TC), n_total=12)
    assert same.column("patch_id").equals(out.column("patch_id"))
    # typical picks sit in denser regions of the descriptor space than a uniform sample's
    desc = patch_descriptors(table)
    row = {p: i for i, p in enumerate(table.column("patch_id").to_pylist())}
    density = typicality(desc, 20)

    def mean_density(sel):
        return density[[row[p] for p in sel.column("patch_id").to_pylist()]].mean()

    rnd = [mean_density(select_patches(table, SelectConfig(**{**TC, "method": "random"}, seed=s), n_total=12))
           for s in range(5)]  # fmt: skip
    assert mean_density(out) > max(rnd)
    # the seed moves k-means: another draw, another set
    others = [set(select_patches(table, SelectConfig(**TC, seed=s), n_total=12).column("patch_id").to_pylist())
              for s in (1, 2)]  # fmt: skip
    assert any(o != set(out.column("patch_id").to_pylist()) for o in others)
    with pytest.raises(ValueError, match=r"\['feature'\].*features 'vit'"):
        select_patches(table, SelectConfig(**TC, features="vit"), n_total=4)
