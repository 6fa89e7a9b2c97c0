"""Reading TensorFlow checkpoints without TensorFlow (srdistill.zeroshot.tfbundle) and converting MZSR's
(srdistill.zeroshot.mzsr.import_tf), on a tiny checkpoint that TensorFlow 2.18 wrote in the layout of
JWSoh/MZSR's released models (tests/fixtures/mzsr_tf/README.md says how)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from srdistill.config import MZSRConfig
from srdistill.sr import imaging
from srdistill.sr.models.mzsr import MZSRNet, from_tf_variables, tf_variable_names
from srdistill.sr.training import load_checkpoint
from srdistill.zeroshot import mzsr, tfbundle

FIXTURE = Path(__file__).parents[1] / "fixtures" / "mzsr_tf"
PREFIX = FIXTURE / "Directx2"
DATA = "Directx2.data-00000-of-00001"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """The MZSR variables as TensorFlow held them when it saved the checkpoint."""
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def copy(tmp_path) -> Path:
    """A writable copy of the fixture checkpoint: its prefix."""
    for name in ("Directx2.index", DATA):
        shutil.copy(FIXTURE / name, tmp_path / name)
    return tmp_path / "Directx2"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _index_block(index: bytes) -> tuple[int, int]:
    """(offset, size) of the SSTable's index block: the second handle of the 48-byte footer."""
    footer = index[-48:]
    pos = _varint(footer, _varint(footer, 0)[1])[1]  # skip the metaindex handle
    offset, pos = _varint(footer, pos)
    return offset, _varint(footer, pos)[0]


def _conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """TensorFlow's conv2d(padding='SAME', stride 1) + bias by definition, float64: the
    cross-correlation out[h, w, o] = sum_ijc x[h+i-1, w+j-1, c] * kernel[i, j, c, o] + bias[o]
    with zeros outside the image. x (H, W, Cin), kernel (3, 3, Cin, Cout) HWIO."""
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(0, 1))  # (H, W, Cin, 3, 3)
    return np.einsum("hwcij,ijco->hwo", windows, kernel.astype(np.float64)) + bias


def _mzsr_reference(x: np.ndarray, variables: dict[str, np.ndarray]) -> np.ndarray:
    """MZSR model.py's forward from its variables: 7 x (conv + ReLU), conv8, plus the input."""
    h = x.astype(np.float64)
    for k in range(1, 9):
        h = _conv_same(h, variables[f"MODEL/conv{k}/kernel"], variables[f"MODEL/conv{k}/bias"])
        if k < 8:
            h = np.maximum(h, 0.0)
    return x + h


# --------------------------------------------------------------------------- the reader


def test_reader_gives_every_tensor_tensorflow_saved(expected):
    bundle = tfbundle.TensorBundle(PREFIX)
    assert bundle.num_shards == 1 and not bundle.big_endian
    # the MZSR variables, their two Adam slots each, beta powers, global_step, stop_grad, note
    assert len(bundle.entries) == 16 * 3 + 5
    for name, value in expected.items():
        got = bundle.read(name)
        assert got.dtype == np.float32 and got.shape == value.shape, name
        assert np.array_equal(got, value), name  # the stored bytes themselves
    assert bundle.read("MODEL/conv3/kernel").shape == (3, 3, 4, 4)  # HWIO as saved
    assert not bundle.read("MODEL/conv1/kernel/Adam").any()  # a fresh Adam slot: zeros
    step = bundle.read("global_step")
    assert step.dtype == np.int64 and step.shape == () and step == 0
    assert bundle.read("stop_grad").dtype == np.bool_ and bool(bundle.read("stop_grad"))
    assert bundle.read("beta1_power") == np.float32(0.9) and bundle.read("beta2_power") == np.float32(0.999)
    with pytest.raises(ValueError, match="note.*DT_STRING is not supported"):
        bundle.read("note")
    with pytest.raises(KeyError, match="MODEL/conv9/kernel"):
        bundle.read("MODEL/conv9/kernel")
    assert tfbundle.read_bundle(PREFIX, ["global_step"]) == {"global_step": 0}


def test_prefix_from_a_file_or_the_folder():
    for given in (PREFIX, FIXTURE / "Directx2.index", FIXTURE / DATA, FIXTURE / "Directx2.meta", FIXTURE):
        assert tfbundle.resolve_prefix(given) == PREFIX  # the folder: its `checkpoint` file
    with pytest.raises(FileNotFoundError, match=r"Model/Directx2\.index does not exist"):
        tfbundle.resolve_prefix(FIXTURE / "Model" / "Directx2")


def test_missing_and_truncated_files_give_clear_errors(copy):
    data = copy.with_name(DATA)
    data.write_bytes(data.read_bytes()[:1000])
    bundle = tfbundle.TensorBundle(copy)
    bundle.read("MODEL/conv1/kernel")  # within the first 1000 bytes
    with pytest.raises(ValueError, match=r"is truncated: MODEL/conv8/kernel needs bytes .* the file has 1000"):
        bundle.read("MODEL/conv8/kernel")
    data.unlink()
    with pytest.raises(FileNotFoundError, match="data file .*Directx2.data-00000-of-00001 .* does not exist"):
        bundle.read("MODEL/conv1/kernel")
    index = copy.with_name("Directx2.index")
    raw = index.read_bytes()
    index.write_bytes(raw[:20] + raw[-48:])  # blocks cut away
    with pytest.raises(ValueError, match="runs past the end of the file"):
        tfbundle.TensorBundle(copy)
    index.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="is not a TensorFlow checkpoint index"):
        tfbundle.TensorBundle(copy)
    index.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1825\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        tfbundle.TensorBundle(copy)
    index.unlink()
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint at"):
        tfbundle.TensorBundle(copy)


def test_compressed_block_is_refused(copy):
    index = copy.with_name("Directx2.index")
    raw = bytearray(index.read_bytes())
    offset, size = _index_block(bytes(raw))
    assert raw[offset + size] == 0  # TensorFlow wrote it uncompressed
    raw[offset + size] = 1  # the trailer says snappy
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"block at byte \d+ is compressed \(snappy\)"):
        tfbundle.TensorBundle(copy)


@pytest.mark.skipif(not tfbundle.CRC32C_AVAILABLE, reason="google-crc32c is not installed")
def test_checksums_catch_a_flipped_byte(copy):
    data = copy.with_name(DATA)
    raw = bytearray(data.read_bytes())
    entry = tfbundle.TensorBundle(copy).entries["MODEL/conv2/kernel"]
    raw[entry.offset + 5] ^= 0x01  # a low mantissa bit of one weight: the size still fits
    data.write_bytes(bytes(raw))
    bundle = tfbundle.TensorBundle(copy)
    with pytest.raises(ValueError, match="MODEL/conv2/kernel .*checksum mismatch"):
        bundle.read("MODEL/conv2/kernel")
    bundle.read("MODEL/conv3/kernel")  # the others are intact
    index = copy.with_name("Directx2.index")
    raw = bytearray(index.read_bytes())
    raw[10] ^= 0x01  # a byte of the first data block
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch in the block at byte 0: the index is corrupted"):
        tfbundle.TensorBundle(copy)


# --------------------------------------------------------------------------- MZSR conversion


def test_import_round_trip_copies_the_tensorflow_weights(expected, tmp_path):
    out = mzsr.import_tf(PREFIX, tmp_path / "d2.safetensors", MZSRConfig(scale=2), meta_trained=True)
    net, meta = load_checkpoint(out)
    assert isinstance(net, MZSRNet) and meta["arch"] == "mzsr" and meta["scale"] == 2
    assert meta["model_kwargs"] == {"n_feats": 4, "n_layers": 8, "upsample": "matlab"}
    assert meta["mzsr_config"]["n_feats"] == 4 and meta["mzsr_config"]["scale"] == 2
    assert meta["imported_from"]["variables"] == tf_variable_names()
    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8
    for k, conv in enumerate(convs, start=1):
        kernel, bias = expected[f"MODEL/conv{k}/kernel"], expected[f"MODEL/conv{k}/bias"]
        # HWIO -> OIHW: weight[o, i, y, x] == kernel[y, x, i, o], bit for bit (a copy)
        assert torch.equal(conv.weight, torch.from_numpy(kernel).permute(3, 2, 0, 1))
        assert torch.equal(conv.bias, torch.from_numpy(bias))
    pre = mzsr.import_tf(PREFIX, tmp_path / "pre.safetensors", MZSRConfig(scale=2), meta_trained=False)
    assert "mzsr_config" not in load_checkpoint(pre)[1]


def test_imported_network_computes_what_mzsr_computes(expected, tmp_path):
    out = mzsr.import_tf(PREFIX, tmp_path / "d2.safetensors", MZSRConfig(scale=2), meta_trained=True)
    net, _ = load_checkpoint(out)
    x = np.load(FIXTURE / "forward_input.npy")  # (1, 10, 12, 3): MZSR's input, already upsampled
    with torch.no_grad():
        got = net.forward_upsampled(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    reference = _mzsr_reference(x[0], expected)
    assert np.abs(reference).max() > 1.0  # the residual is far from zero: the check has teeth
    np.testing.assert_allclose(got[0], reference, rtol=0, atol=2e-5)
    # and what TensorFlow itself computed with these weights when it wrote the fixture
    np.testing.assert_allclose(got, np.load(FIXTURE / "forward_output.npy"), rtol=0, atol=2e-5)


def test_conversion_errors_name_the_variables(expected):
    variables = dict(expected)
    del variables["MODEL/conv8/bias"], variables["MODEL/conv3/kernel"]
    with pytest.raises(ValueError, match=r"lacks MZSR variables \['MODEL/conv3/kernel', 'MODEL/conv8/bias'\]"):
        from_tf_variables(variables, 2)
    wrong = {**expected, "MODEL/conv2/kernel": np.zeros((3, 3, 4, 5), np.float32)}
    with pytest.raises(ValueError, match=r"MODEL/conv2/kernel has shape \(3, 3, 4, 5\), expected \(3, 3, 4, 4\)"):
        from_tf_variables(wrong, 2)
    wrong = {**expected, "MODEL/conv8/bias": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match=r"MODEL/conv8/bias has shape \(4,\), expected \(3,\)"):
        from_tf_variables(wrong, 2)
    ints = {**expected, "MODEL/conv1/kernel": expected["MODEL/conv1/kernel"].astype(np.int32)}
    with pytest.raises(ValueError, match="MODEL/conv1/kernel has dtype int32.*unsupported"):
        from_tf_variables(ints, 2)
    with pytest.raises(ValueError, match="has MODEL/conv8/kernel: more than n_layers=7"):
        from_tf_variables(expected, 2, n_layers=7)
    with pytest.raises(ValueError, match="lacks MZSR variables"):
        mzsr.import_tf(PREFIX, Path("unused.safetensors"), MZSRConfig(), meta_trained=True, scope="NET")


# --------------------------------------------------------------------------- MZSR's input


def test_forward_upsamples_with_matlab_bicubic_as_mzsr():
    """MZSRNet's default forward feeds the body MATLAB-bicubic upsampled input, MZSR's
    (pretraining included); 'torch' keeps PyTorch's bicubic as an option."""
    torch.manual_seed(0)
    net = MZSRNet(3, n_feats=4, n_layers=3)
    assert net.config["upsample"] == "matlab"
    x = torch.rand(2, 3, 9, 11)
    matlab = imaging.imresize(x.permute(0, 2, 3, 1).double().numpy(), 3, spatial_axes=(1, 2))  # (2, 27, 33, 3)
    matlab = torch.from_numpy(matlab).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.forward_upsampled(matlab), rtol=0, atol=1e-5)
        net.body[-1].weight.zero_()
        net.body[-1].bias.zero_()
        torch.testing.assert_close(net(x), matlab, rtol=0, atol=1e-6)  # zero residual: the upsampling
        torch_net = MZSRNet(3, n_feats=4, n_layers=3, upsample="torch")
        torch_net.load_state_dict(net.state_dict())
        bicubic = torch.nn.functional.interpolate(x, scale_factor=3, mode="bicubic", align_corners=False)
        torch.testing.assert_close(torch_net(x), bicubic)
        assert (torch_net(x) - net(x)).abs().max() > 1e-2  # the two bicubics differ
    with pytest.raises(ValueError, match="upsample 'lanczos'"):
        MZSRNet(2, upsample="lanczos")
