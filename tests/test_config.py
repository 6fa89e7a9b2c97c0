from __future__ import annotations

import json

import pytest

from srdistill.config import MineConfig, RunConfig, SelectConfig, load_config, parse_override, preset_names


def test_presets_load_and_patch_preset_expands():
    assert {"tiny", "demo", "srdd"} <= set(preset_names())
    srdd = load_config("srdd")
    assert (srdd.mine.patch_size, srdd.mine.stride) == (512, 256)
    assert srdd.cluster.k == 7 and srdd.select.ipc == 10 and srdd.scale == 4
    assert MineConfig(patch_preset="div2k").patch_size == 192


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        RunConfig.model_validate({"mine": {"patchsize": 3}})
    with pytest.raises(ValueError, match="keep_rule"):
        MineConfig(keep_rule="best")
    with pytest.raises(ValueError, match="exactly one budget"):
        SelectConfig(ipc=3, pixel_fraction=0.1)
    with pytest.raises(ValueError, match="divisible"):
        MineConfig(patch_size=30, stride=10)
    with pytest.raises(ValueError, match="preset 'nope'"):
        load_config("nope")


def test_file_and_overrides_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  iterations: 7\ncluster:\n  k: 4\n")
    cfg = load_config("tiny", f, ["cluster.k=5", "select.ipc=3"])
    assert cfg.train.iterations == 7 and cfg.cluster.k == 5 and cfg.select.ipc == 3
    assert cfg.mine.patch_size == 64  # from the preset
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError):
        parse_override("novalue")


@pytest.mark.parametrize("stage, field, other", [
    ("mine", "psnr_bic_resize", "opencv"), ("embed", "normalize", False), ("cluster", "method", "kmeans"),
    ("synthesize", "guidance_channels", 3), ("synthesize", "vae_path", "stabilityai/sd-vae-ft-mse"),
])  # fmt: skip
def test_options_at_their_old_behaviour_keep_the_stage_fingerprint(stage, field, other):
    """An option added later, left at the value that does what the stage did before, is not in
    the stage's fingerprint (an upgrade redoes nothing); any other value is."""
    base = json.loads(RunConfig().stage_json(stage))
    assert field not in base
    changed = RunConfig(**{stage: {field: other}})
    assert json.loads(changed.stage_json(stage))[field] == other
