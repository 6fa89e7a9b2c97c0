"""The corpus plan: listing a folder, manifest files in every supported format, shards, errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from srdistill.corpus import input_signature, num_shards, plan_corpus, read_shard

EXTS = (".png", ".jpg")


def _plan(tmp_path, input_uri, per_shard=2):
    out = str(tmp_path / "plan.parquet")
    return plan_corpus(str(input_uri), out, extensions=EXTS, images_per_shard=per_shard), out


def test_folder_listing_keys_shards_and_signature(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for name in ("b.png", "a.PNG", "sub/c.jpg", "notes.txt"):
        (root / name).write_bytes(b"x")
    plan, out = _plan(tmp_path, root)
    assert (plan.images, plan.shards, plan.other_files_ignored, plan.source) == (3, 2, 1, "listing")
    assert num_shards(out) == 2
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == ["a.PNG", "b.png", "sub/c.jpg"]
    assert rows[2]["uri"] == str(root / "sub" / "c.jpg")
    assert read_shard(out, 1).column("key").to_pylist() == ["sub/c.jpg"]
    with pytest.raises(IndexError, match="2 shards, no shard 2"):
        read_shard(out, 2)
    before = input_signature(str(root), EXTS)
    assert plan.digest == before
    (root / "d.png").write_bytes(b"xy")
    assert input_signature(str(root), EXTS) != before


@pytest.mark.parametrize("fmt", ["parquet", "csv", "txt"])
def test_manifest_formats_resolve_relative_entries(tmp_path, fmt):
    entries = ["img/a.png", "/abs/b.png", "s3://bucket/c.jpg", "readme.md"]
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"path": entries, "label": [1, 2, 3, 4]}), manifest)
    elif fmt == "csv":
        manifest.write_text("id,uri\n" + "".join(f"{i},{e}\n" for i, e in enumerate(entries)))
    else:
        manifest.write_text("\n".join(entries) + "\n")
    plan, out = _plan(tmp_path, manifest, per_shard=10)
    assert (plan.images, plan.shards, plan.other_files_ignored, plan.source) == (3, 1, 1, "manifest")
    table = pq.read_table(out)
    assert table.column("uri").to_pylist() == [str(tmp_path / "img" / "a.png"), "/abs/b.png", "s3://bucket/c.jpg"]
    assert table.column("key").to_pylist() == entries[:3]  # ids survive moving the corpus
    assert input_signature(str(manifest), EXTS) != ""


def test_manifest_errors_name_the_file_and_the_problem(tmp_path):
    two = tmp_path / "two.parquet"
    pq.write_table(pa.table({"a": ["x.png"], "b": ["y.png"]}), two)
    with pytest.raises(ValueError, match=r"two.parquet.*columns \['a', 'b'\]"):
        _plan(tmp_path, two)
    empty = tmp_path / "empty.csv"
    empty.write_text("uri\nx.png\n\"\"\n")
    with pytest.raises(ValueError, match=r"empty.csv.*entry 1 .* is empty"):
        _plan(tmp_path, empty)
    with pytest.raises(FileNotFoundError, match="manifest .*missing.csv"):
        _plan(tmp_path, tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        _plan(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="images_per_shard"):
        _plan(tmp_path, tmp_path, per_shard=0)


@pytest.mark.parametrize(("n", "per_shard", "min_shards", "sizes"), [
    (16, 32, 4, [4, 4, 4, 4]),  # 16 large images on 2 CPUs: two shards per CPU, not one shard
    (5, 32, 4, [2, 1, 1, 1]),  # as many shards as asked, sizes within one
    (3, 32, 4, [1, 1, 1]),  # never an empty shard
    (10, 2, 4, [2, 2, 2, 2, 2]),  # enough images for min_shards full shards: images_per_shard wins
    (9, 2, 4, [2, 2, 2, 2, 1]),
])  # fmt: skip
def test_min_shards_cut_a_small_corpus_finer(tmp_path, n, per_shard, min_shards, sizes):
    manifest = tmp_path / "m.txt"
    manifest.write_text("".join(f"/data/img_{i:02d}.png\n" for i in range(n)))
    out = str(tmp_path / "plan.parquet")
    plan = plan_corpus(str(manifest), out, extensions=EXTS, images_per_shard=per_shard, min_shards=min_shards)
    assert plan.shards == num_shards(out) == len(sizes) and plan.images_per_shard == max(sizes)
    assert [read_shard(out, s).num_rows for s in range(plan.shards)] == sizes
    rows = [r for s in range(plan.shards) for r in read_shard(out, s).column("key").to_pylist()]
    assert rows == [f"/data/img_{i:02d}.png" for i in range(n)]  # every image once, in order
