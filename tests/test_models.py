"""SR networks: parameter counts from the papers' designs, official EDSR layer names, shapes."""

import pytest
import torch
import torch.nn.functional as F

from srdistill.models import ARCHS, EDSR, ESPCN, build_model


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k + cout


def _edsr_baseline_count(scale: int) -> int:
    """EDSR-baseline (arXiv:1707.02921, Fig. 3/Table 1): head, 16 res blocks of two convs, body
    conv, sub-pixel upsampler (x2/x4: one/two conv 64->256; x3: one conv 64->576), last conv."""
    up = {2: _conv(64, 256), 3: _conv(64, 576), 4: 2 * _conv(64, 256)}[scale]
    return _conv(3, 64) + 16 * 2 * _conv(64, 64) + _conv(64, 64) + up + _conv(64, 3)


@pytest.mark.parametrize("scale, expected", [(2, 1_369_859), (3, 1_554_499), (4, 1_517_571)])
def test_edsr_baseline_trainable_parameter_count(scale, expected):
    # "Parameters" as reported for EDSR-baseline (1.37 M at x2): trainable ones only. The two
    # frozen 1x1 mean-shift convolutions (2 * (9 + 3) = 24 values) are not counted.
    assert _edsr_baseline_count(scale) == expected
    model = EDSR(scale)
    assert _trainable(model) == expected
    assert sum(p.numel() for p in model.parameters()) == expected + 24


def test_edsr_layer_names_match_official_release():
    def names(scale, tail):
        keys = {"sub_mean", "add_mean", "head.0", "body.16", "tail.1", *tail}
        keys |= {f"body.{i}.body.{j}" for i in range(16) for j in (0, 2)}
        return {f"{k}.{p}" for k in keys for p in ("weight", "bias")}

    assert set(EDSR(2).state_dict()) == names(2, ["tail.0.0"])
    assert set(EDSR(3).state_dict()) == names(3, ["tail.0.0"])
    assert set(EDSR(4).state_dict()) == names(4, ["tail.0.0", "tail.0.2"])
    assert EDSR(3).state_dict()["tail.0.0.weight"].shape == (576, 64, 3, 3)


def test_edsr_mean_shift_is_frozen_div2k_mean():
    model = EDSR(2)
    assert not any(p.requires_grad for p in model.sub_mean.parameters())
    assert not any(p.requires_grad for p in model.add_mean.parameters())
    x = torch.rand(1, 3, 5, 5) * 255
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(model.sub_mean(x), x - mean)
    torch.testing.assert_close(model.add_mean(model.sub_mean(x)), x)


def test_edsr_works_in_0_255_internally():
    # With every conv of head/body/tail zeroed except an identity path, the output must be the
    # [0, 1] input range again: sub_mean/add_mean and the *255 / /255 must cancel exactly.
    model = EDSR(2, n_resblocks=1, n_feats=12)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.zeros_(p)
    # tail.1 bias alone sets the output: out = (bias + mean*255) / 255
    with torch.no_grad():
        model.tail[1].bias.copy_(torch.tensor([10.0, 20.0, 30.0]))
    y = model(torch.rand(1, 3, 4, 4))
    expected = (
        torch.tensor([10.0, 20.0, 30.0]) + 255 * torch.tensor([0.4488, 0.4371, 0.4040])
    ) / 255
    torch.testing.assert_close(y[0, :, 0, 0], expected)


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shapes_odd_sizes(name, scale):
    kwargs = {"n_resblocks": 2, "n_feats": 16} if name == "edsr-baseline" else {}
    model = build_model(name, scale, **kwargs)
    x = torch.rand(2, 3, 17, 23)
    y = model(x)
    assert y.shape == (2, 3, 17 * scale, 23 * scale)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_espcn_layers_and_bicubic_residual():
    model = ESPCN(3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 64, (5, 5)),
        (64, 32, (3, 3)),
        (32, 27, (3, 3)),
    ]
    x = torch.rand(1, 3, 9, 11)
    bicubic = F.interpolate(x, scale_factor=3, mode="bicubic", align_corners=False)
    # last conv starts at zero: the untrained model is exactly the bicubic residual path
    torch.testing.assert_close(model(x), bicubic)
    with torch.no_grad():
        convs[-1].bias.fill_(0.1)
    torch.testing.assert_close(model(x), bicubic + 0.1)


def test_archs_and_build_model_errors():
    assert ARCHS == {"edsr-baseline": EDSR, "espcn": ESPCN}
    assert isinstance(build_model("espcn", 2), ESPCN)
    edsr = build_model("edsr-baseline", 4, n_resblocks=3)
    assert isinstance(edsr, EDSR) and edsr.scale == 4 and len(edsr.body) == 4
    with pytest.raises(ValueError, match=r"'rcan'.*edsr-baseline.*espcn"):
        build_model("rcan", 2)
    with pytest.raises(ValueError, match="scale"):
        EDSR(5)
    with pytest.raises(ValueError, match="act"):
        ESPCN(2, act="gelu")
