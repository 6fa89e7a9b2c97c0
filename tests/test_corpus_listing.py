"""Corpus listing that cannot be fooled (issue 16, item 1): symlink loops, dangling and looping
links, unreadable entries and directories named like images are recorded, not multiplied or
lost; a file reached under several names and images with the same decoded pixels are mined once."""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import T91
from srdistill import storage
from srdistill.config import MineConfig, load_config
from srdistill.corpus import plan_corpus, read_shard
from srdistill.distill import mining
from srdistill.distill.mining import dedupe_parts, mine_image, mine_shard, summarize_parts

CFG = MineConfig(patch_size=64, stride=64)


def _png(path, seed: int, size=(96, 128)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _plan(root, tmp_path, per_shard=100):
    uri = str(tmp_path / "plan.parquet")
    plan = plan_corpus(str(root), uri, extensions=CFG.extensions, images_per_shard=per_shard)
    rows = [r for s in range(plan.shards) for r in read_shard(uri, s).to_pylist()]
    return plan, uri, rows


def _mine(plan_uri, shards, parts):
    for s in shards:
        mine_shard(plan_uri, s, str(parts), CFG)
    return summarize_parts(str(parts), CFG, str(parts.parent / "skipped.parquet"))


def _skipped(parts) -> dict[str, str]:
    table = pq.read_table(parts.parent / "skipped.parquet")
    return {os.path.basename(r["source"]): r["error"] for r in table.to_pylist()}


def test_symlink_loop_lists_each_real_image_once(tmp_path):
    root = tmp_path / "corpus"
    _png(root / "a.png", 0)
    _png(root / "b.png", 1)
    _png(root / "sub" / "c.png", 2)
    os.symlink(".", root / "loopdir")  # on main: 2 images listed 81 times
    os.symlink("..", root / "sub" / "up")
    os.symlink("sub", root / "zz_alias")  # a second name of a directory: walked once

    assert storage.list_files(root, [".png"]) == [str(root / n) for n in ("a.png", "b.png", "sub/c.png")]
    plan, plan_uri, rows = _plan(root, tmp_path)
    assert (plan.images, plan.skipped, plan.shards) == (3, 3, 1)
    skips = {r["key"]: r["skip"] for r in rows if r["skip"]}
    assert skips["loopdir"].startswith("symlink loop: loopdir -> . leads back to the corpus root")
    assert skips["sub/up"].startswith("symlink loop: sub/up -> .. leads back to the corpus root")
    assert skips["zz_alias"].startswith("same directory as sub")
    assert [r["key"] for r in rows if not r["skip"]] == ["a.png", "b.png", "sub/c.png"]

    parts = tmp_path / "mine" / "patches"
    _, counts = _mine(plan_uri, range(plan.shards), parts)
    assert (counts["images_mined"], counts["images_skipped"], counts["images_duplicate"]) == (3, 3, 0)
    assert counts["patches"] == 3 * 2  # one row of two 64x64 windows in each 96x128 image
    assert set(_skipped(parts)) == {"loopdir", "up", "zz_alias"}


def test_dangling_looping_unreadable_and_folders_named_like_images(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    _png(root / "ok.png", 0)
    _png(root / "x.png" / "inner.png", 1)  # a folder named like an image: recorded, still walked
    os.symlink("nowhere.png", root / "dangling.png")
    os.symlink("self.png", root / "self.png")
    os.symlink("nowhere.txt", root / "notes.txt")  # not named like an image: only counted
    _png(root / "locked.png", 2)
    _png(root / "closed" / "hidden.png", 3)
    (root / "readme.md").write_text("ignored")

    real_stat, real_scandir = os.stat, os.scandir

    def stat(path, *a, **k):  # the tests run as root: no chmod makes a file unreadable
        if os.fspath(path).endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_stat(path, *a, **k)

    def scandir(path="."):
        if os.fspath(path).endswith("closed"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "scandir", scandir)
    plan, plan_uri, rows = _plan(root, tmp_path, per_shard=2)
    monkeypatch.undo()

    assert (plan.images, plan.skipped, plan.other_files_ignored) == (2, 5, 2)
    assert plan.shards == 4
    assert [r["key"] for r in rows if not r["skip"]] == ["ok.png", "x.png/inner.png"]
    parts = tmp_path / "mine" / "patches"
    _, counts = _mine(plan_uri, range(plan.shards), parts)
    assert (counts["images_mined"], counts["images_skipped"]) == (2, 5)
    assert _skipped(parts) == {
        "closed": "unreadable directory: Permission denied",
        "dangling.png": "dangling symlink: dangling.png -> nowhere.png",
        "locked.png": "unreadable: Permission denied",
        "self.png": "symlink loop: self.png -> self.png never resolves",
        "x.png": "a directory, not an image file",
    }


def test_a_file_under_two_names_is_listed_once(tmp_path):
    root = tmp_path / "corpus"
    _png(root / "b.png", 0)
    os.symlink("b.png", root / "c_link.png")
    os.link(root / "b.png", root / "a_hard.png")
    assert storage.list_files(root) == [str(root / "a_hard.png")]  # the smallest name wins
    plan, _, rows = _plan(root, tmp_path)
    assert (plan.images, plan.skipped) == (1, 2)
    assert {r["key"]: r["skip"] for r in rows} == {
        "a_hard.png": "",
        "b.png": f"duplicate of {root / 'a_hard.png'} (same file)",
        "c_link.png": f"duplicate of {root / 'a_hard.png'} (same file)",
    }


@pytest.fixture
def dup_corpus(tmp_path):
    """t36 and t65 of T91 (the same file twice), t36 re-encoded (other bytes, same pixels) and
    two other images."""
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("t36.png", "t65.png", "t1.png"):
        shutil.copy(T91 / name, root / name)
    assert (root / "t36.png").read_bytes() == (root / "t65.png").read_bytes()
    Image.open(T91 / "t36.png").save(root / "z_reencoded.png", compress_level=0)
    assert (root / "z_reencoded.png").read_bytes() != (root / "t36.png").read_bytes()
    _png(root / "t2.png", 0)
    return root


def test_duplicates_are_mined_once_whatever_the_shard_order(dup_corpus, tmp_path):
    plan, plan_uri, _ = _plan(dup_corpus, tmp_path, per_shard=1)
    assert plan.shards == 5
    results = []
    for order, name in ((range(5), "forward"), (reversed(range(5)), "backward")):
        parts = tmp_path / name / "patches"
        _, counts = _mine(plan_uri, order, parts)
        assert (counts["images_mined"], counts["images_skipped"], counts["images_duplicate"]) == (3, 2, 2)
        assert _skipped(parts) == {"t65.png": f"duplicate of {dup_corpus / 't36.png'}",
                                   "z_reencoded.png": f"duplicate of {dup_corpus / 't36.png'}"}  # fmt: skip
        table = pq.read_table(parts)
        results.append(table.filter(pc.equal(table.column("error"), "")).sort_by("patch_id"))
        again = dict(counts)
        _, counts2 = summarize_parts(str(parts), CFG, str(parts.parent / "skipped.parquet"))
        assert counts2 == again  # idempotent
    assert results[0].equals(results[1])
    # the patch ids of the images kept are those of mining them alone
    mined = results[0]
    want = {r["patch_id"] for n in ("t1.png", "t2.png", "t36.png")
            for r in mine_image(str(dup_corpus / n), CFG, key=n)}  # fmt: skip
    assert set(mined.column("patch_id").to_pylist()) == want


def test_dedupe_resumes_after_a_kill_between_part_rewrites(dup_corpus, tmp_path, monkeypatch):
    plan, plan_uri, _ = _plan(dup_corpus, tmp_path, per_shard=1)
    parts = tmp_path / "mine" / "patches"
    for s in range(plan.shards):
        mine_shard(plan_uri, s, str(parts), CFG)
    writes = []
    real = storage.write_parquet

    def write_once(uri, table, **kw):
        if writes:
            raise KeyboardInterrupt  # killed after the first rewrite
        writes.append(uri)
        real(uri, table, **kw)

    monkeypatch.setattr(storage, "write_parquet", write_once)
    with pytest.raises(KeyboardInterrupt):
        dedupe_parts(str(parts))
    monkeypatch.undo()
    assert len(writes) == 1
    assert dedupe_parts(str(parts)) == 2
    _, counts = summarize_parts(str(parts), CFG, str(tmp_path / "mine" / "skipped.parquet"))
    assert (counts["images_mined"], counts["images_duplicate"]) == (3, 2)


@pytest.mark.slow
def test_pipeline_until_mine_records_listing_problems_and_duplicates(dup_corpus, tmp_path, ray_local):
    from srdistill.run.pipeline import run_pipeline

    os.symlink(".", dup_corpus / "loopdir")
    os.symlink("gone.png", dup_corpus / "dangling.png")
    (dup_corpus / "folder.png").mkdir()
    run_dir = tmp_path / "run"
    manifest = run_pipeline(dup_corpus, run_dir, load_config("tiny"), until="mine", log=lambda s: None)
    counts = manifest["stages"]["mine"]["counts"]
    assert counts["images_listed"] == 5
    assert (counts["images_mined"], counts["images_skipped"], counts["images_duplicate"]) == (3, 5, 2)
    skipped = {os.path.basename(r["source"]): r["error"]
               for r in pq.read_table(run_dir / "mine" / "skipped.parquet").to_pylist()}  # fmt: skip
    assert skipped == {
        "dangling.png": "dangling symlink: dangling.png -> gone.png",
        "folder.png": "a directory, not an image file",
        "loopdir": "symlink loop: loopdir -> . leads back to the corpus root, not descended again",
        "t65.png": f"duplicate of {dup_corpus / 't36.png'}",
        "z_reencoded.png": f"duplicate of {dup_corpus / 't36.png'}",
    }
    assert {s["file"].rsplit("/", 1)[-1] for s in manifest["skipped_inputs"]} == set(skipped)
    ids = mining.read_patches(str(run_dir / "mine"), ["patch_id", "source"])
    assert sorted({os.path.basename(s) for s in ids.column("source").to_pylist()}) == ["t1.png", "t2.png", "t36.png"]
