"""Verified stage outputs: a finished stage's parts are recorded in the manifest and checked on
resume; a missing, truncated or unreadable part is redone (exactly its shard), and everything
downstream reruns; a part that cannot be read mid-stage is one line naming it."""

from __future__ import annotations


import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from srdistill import storage
from srdistill.cli import app
from srdistill.config import load_config
from srdistill.run.pipeline import run_pipeline

from conftest import copy_t91

pytestmark = pytest.mark.slow

OVERRIDES = {"embed.allow_random_init": "true", "mine.images_per_shard": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four vendored T91 images (one shard each with ``mine.images_per_shard=1``)."""
    return copy_t91(tmp_path_factory.mktemp("corpus"), 4)


def _tiny():
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in OVERRIDES.items()])


def _selected(run_dir):
    return pq.read_table(run_dir / "select" / "selected.parquet").sort_by("patch_id")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_parts_are_recorded_and_bad_parts_are_redone(corpus, tmp_path, ray_local):
    run_dir = tmp_path / "run"
    manifest = run_pipeline(corpus, run_dir, _tiny(), until="select", log=lambda s: None)
    stages = manifest["stages"]
    assert stages["plan"]["counts"]["shards"] == 4
    parts = stages["mine"]["parts"]
    assert sorted(parts) == [f"part-{i:06d}.parquet" for i in range(4)]
    for name, rec in parts.items():  # rows and bytes of the files themselves
        path = run_dir / "mine" / "patches" / name
        assert rec == {"rows": pq.read_metadata(path).num_rows, "bytes": path.stat().st_size}
    assert sum(r["rows"] for r in stages["embed"]["parts"].values()) == stages["embed"]["counts"]["patches"]
    assert set(stages["cluster"]["parts"]) == set(stages["embed"]["parts"])
    kept = stages["mine"]["counts"]["patches_kept"]
    reference = _selected(run_dir)

    # the measured case: a deleted mine part of a finished run was silently ignored
    (run_dir / "mine" / "patches" / "part-000001.parquet").unlink()
    lines: list[str] = []
    manifest = run_pipeline(corpus, run_dir, _tiny(), until="select", log=lines.append)
    redone = [x for x in lines if "part-" in x and "redone" in x]
    assert len(redone) == 1 and "part-000001.parquet is missing" in redone[0], lines
    stages = manifest["stages"]
    assert stages["mine"]["counts"]["shards_mined_now"] == 1  # exactly that shard
    assert stages["mine"]["counts"]["patches_kept"] == kept
    for name in ("mine", "embed", "cluster", "select"):  # it and everything downstream reran
        assert stages[name]["skipped"] is False, name
    assert stages["embed"]["counts"]["patches"] == kept
    assert _selected(run_dir).equals(reference)

    # a truncated embed part is redone, and the stages after it rerun
    _truncate(run_dir / "embed" / "parts" / "part-000002.parquet")
    lines = []
    manifest = run_pipeline(corpus, run_dir, _tiny(), until="select", log=lines.append)
    redone = [x for x in lines if "part-" in x and "redone" in x]
    assert len(redone) == 1 and "part-000002.parquet cannot be read" in redone[0], lines
    stages = manifest["stages"]
    assert stages["mine"]["skipped"] is True
    assert stages["embed"]["skipped"] is False and stages["embed"]["counts"]["shards_embedded_now"] == 1
    assert stages["cluster"]["skipped"] is False and stages["select"]["skipped"] is False
    assert _selected(run_dir).equals(reference)

    # nothing wrong: every stage is skipped
    manifest = run_pipeline(corpus, run_dir, _tiny(), until="select", log=lambda s: None)
    assert all(manifest["stages"][s]["skipped"] for s in ("mine", "embed", "cluster", "select"))


def test_unreadable_part_mid_stage_is_one_line_naming_it(corpus, tmp_path, ray_local, monkeypatch):
    from srdistill.run.rundir import Run

    run_dir = tmp_path / "run"
    run_pipeline(corpus, run_dir, _tiny(), until="mine", log=lambda s: None)
    bad = run_dir / "mine" / "patches" / "part-000002.parquet"
    _truncate(bad)
    # the part breaks after the checks on resume (simulated): embed's workers find it
    monkeypatch.setattr(Run, "drop_bad_parts", lambda self, stage, recorded: {})
    args = ["run", "--input", str(corpus), "--out", str(run_dir), "--preset", "tiny", "--until", "embed"]
    for k, v in OVERRIDES.items():
        args += ["--set", f"{k}={v}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "rerun" in errors[0], result.output
    assert "Traceback" not in result.output
    # as the line says, a rerun redoes it
    monkeypatch.undo()
    lines: list[str] = []
    manifest = run_pipeline(corpus, run_dir, _tiny(), until="embed", log=lines.append)
    redone = [x for x in lines if "part-" in x and "redone" in x]
    assert len(redone) == 1 and "part-000002.parquet cannot be read" in redone[0], lines
    assert manifest["stages"]["mine"]["counts"]["shards_mined_now"] == 1
    assert manifest["stages"]["embed"]["counts"]["patches"] == manifest["stages"]["mine"]["counts"]["patches_kept"]


def test_storage_names_the_unreadable_part(tmp_path):
    import pyarrow as pa

    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"a": list(range(100))}), folder / f"part-{i:06d}.parquet")
    (folder / ".tmp-part.parquet").write_bytes(b"in flight")
    assert storage.parquet_parts(folder) == {
        f"part-{i:06d}.parquet": {"rows": 100, "bytes": (folder / f"part-{i:06d}.parquet").stat().st_size}
        for i in range(2)
    }
    _truncate(folder / "part-000001.parquet")
    one = lambda f: storage.read_parquet(f / "part-000001.parquet")  # noqa: E731
    for read in (storage.read_dataset, storage.parquet_parts, one):
        with pytest.raises(storage.UnreadableFileError, match="part-000001.parquet cannot be read") as e:
            read(folder)
        assert "\n" not in str(e.value)
