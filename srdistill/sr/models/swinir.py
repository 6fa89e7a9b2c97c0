"""SwinIR-light: Image Restoration Using Swin Transformer, lightweight SR variant.

Paper: Liang, Cao, Sun, Zhang, Van Gool, Timofte, ICCV Workshops 2021, arXiv:2108.10257.

Shallow 3x3 conv; deep features from residual Swin Transformer blocks (RSTB: ``depth`` Swin
layers with (shifted) window self-attention and relative position bias, a 3x3 conv and a skip),
a LayerNorm, a 3x3 conv and a long skip; reconstruction by one conv + PixelShuffle
("pixelshuffledirect"). The lightweight configuration: ``embed_dim`` 60, depths [6, 6, 6, 6],
heads [6, 6, 6, 6], window 8, MLP ratio 2, patch size 1, patch norm on, no absolute position
embedding, one-conv residual connection, ``img_range`` 1, DIV2K mean subtracted.

What differs here from the official release (JingyunLiang/SwinIR, ``models/network_swinir.py``
with ``upsampler="pixelshuffledirect"``, ``resi_connection="1conv"``):

* Only the lightweight SR architecture is built (no "pixelshuffle", "nearest+conv" or
  denoising heads, no "3conv" residual connection, no absolute position embedding, no
  dropout other than stochastic depth, no gradient checkpointing, no FLOP counter).
* Any input size: the input is padded on the bottom/right to the next multiple of
  ``window_size`` by mirroring with the edge pixel repeated (the flip-and-concatenate padding
  of the official ``main_test_swinir.py``, repeated when an image is smaller than the pad),
  and the output is cropped back to ``(scale*h, scale*w)``. The official test script always
  pads, by 1 to ``window_size`` rows/columns, even when the size is already a multiple; here
  a multiple (e.g. 64x64 training crops) is not padded, so border pixels of such images can
  differ slightly from the official script's.
* The shifted-window mask for an input size other than ``img_size`` is computed once per
  forward pass and shared by all blocks (the official code recomputes it in every block).
* Own implementation (no timm): stochastic depth, truncated-normal init via
  ``torch.nn.init.trunc_normal_`` (same ``std=0.02`` and ``[-2, 2]`` bounds as timm).

State dict: the official key names and buffers, so the released lightweight checkpoints
(``002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{2,3,4}.pth``, weights under ``"params"``) load with
``strict=True``: ``conv_first``, ``patch_embed.norm``,
``layers.{i}.residual_group.blocks.{j}.{norm1, attn.relative_position_bias_table,
attn.relative_position_index, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``,
``layers.{i}.residual_group.blocks.{odd j}.attn_mask`` (persistent buffer of shape
``(img_size/window)^2 x window^2 x window^2``, so ``img_size`` must be 64 to load them),
``layers.{i}.conv``, ``norm``, ``conv_after_body``, ``upsample.0``. The DIV2K mean is a
non-persistent buffer (a plain attribute upstream, so not in the checkpoints).

Parameters (all trainable): 910,152 at x2, 918,267 at x3, 929,628 at x4. The paper's 878K
(x2) leaves out the 24 relative-position-bias tables (24 x 225 x 6 = 32,400 values):
910,152 - 32,400 = 877,752. Lightweight-SR papers that count every parameter list SwinIR-light
at 910K / 918K / 930K.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from srdistill.sr.models.edsr import DIV2K_RGB_MEAN
_MASK_VALUE = -100.0  # added to attention logits between tokens of different shifted regions


# --------------------------------------------------------------------------- helpers


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split ``(B, H, W, C)`` into non-overlapping windows ``(B * nW, ws * ws, C)``.

    ``H`` and ``W`` must be multiples of ``window_size``; windows are ordered row-major per
    image (``nW = (H / ws) * (W / ws)``), tokens row-major inside a window.
    """
    b, h, w, c = x.shape
    ws = window_size
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)  # (B*nW, ws*ws, C)


def window_merge(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: ``(B * nW, ws * ws, C)`` -> ``(B, H, W, C)``."""
    ws = window_size
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)  # (B, H/ws, W/ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the ``(2ws-1)^2`` bias table for every token pair of a window.

    Token ``i`` at ``(r_i, c_i)`` and ``j`` at ``(r_j, c_j)`` get
    ``(r_i - r_j + ws - 1) * (2ws - 1) + (c_i - c_j + ws - 1)``. Returns ``(ws*ws, ws*ws)``
    int64 (the ``relative_position_index`` buffer of Swin / SwinIR).
    """
    ws = window_size
    rows, cols = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # (ws*ws,)
    d_rows = rows[:, None] - rows[None, :] + ws - 1  # (N, N) in [0, 2ws-2]
    d_cols = cols[:, None] - cols[None, :] + ws - 1
    return d_rows * (2 * ws - 1) + d_cols


def shifted_window_mask(h: int, w: int, window_size: int, shift: int) -> torch.Tensor:
    """Attention mask of shifted-window attention (Swin Sec. 3.2) on an ``h x w`` feature map.

    After the cyclic shift by ``-shift``, the last ``window_size`` rows (columns) of the map
    hold pieces from three regions split at ``-window_size`` and ``-shift``; tokens of one
    window may only attend to tokens of the same region. Returns ``(nW, ws*ws, ws*ws)``
    float32: 0 within a region, -100 across regions (``nW = h*w / ws^2``).
    """

    def region(n: int) -> torch.Tensor:  # (n,) region label 0, 1, 2 along one axis
        pos = torch.arange(n)
        return (pos >= n - window_size).long() + (pos >= n - shift).long()

    labels = region(h)[:, None] * 3 + region(w)[None, :]  # (h, w), 9 regions
    labels = window_partition(labels[None, :, :, None].float(), window_size).squeeze(-1)
    different = labels[:, :, None] != labels[:, None, :]  # (nW, N, N)
    return different.float() * _MASK_VALUE


def _mirror_pad(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Extend ``x`` along ``dim`` by ``pad`` by appending its mirror image (edge repeated).

    The sequence continues x, flip(x), x, flip(x), ... so any ``pad`` works, also one larger
    than the image (official ``main_test_swinir.py`` padding for ``pad <= size``).
    """
    if pad == 0:
        return x
    n = x.shape[dim]
    pieces = [x if i % 2 == 0 else x.flip(dim) for i in range(1 + -(-pad // n))]
    return torch.cat(pieces, dim).narrow(dim, 0, n + pad)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``
    and scale the others by ``1 / (1 - p)``; identity in eval mode or with ``p = 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------- modules


class Mlp(nn.Module):
    """Token MLP ``fc2(gelu(fc1(x)))``: ``(..., C)`` -> ``(..., C)``, hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    ``softmax(q k^T / sqrt(d) + B[rel(i, j)] + mask) v`` per head (Swin Eq. 4), then a linear
    projection. Input and output ``(B * nW, N, C)`` with ``N = window_size^2``.

    Args:
        dim: channels ``C``.
        window_size: window side ``ws``.
        num_heads: attention heads (must divide ``dim``).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B * nW, N, C)``; ``mask``: ``(nW, N, N)`` additive (0 / -100) or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, nH, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, nH, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # + (1, nH, N, N)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        out = attn.softmax(dim=-1) @ v  # (B*nW, nH, N, d)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinTransformerBlock(nn.Module):
    """Swin layer: ``x + W-MSA(LN(x))`` then ``x + MLP(LN(x))``, windows shifted by ``shift``.

    Input and output ``(B, H*W, C)`` tokens of an ``H x W`` map (multiples of the window).
    With ``shift > 0`` the block owns the mask for ``input_resolution`` as the persistent
    buffer ``attn_mask`` (as the official code, so checkpoints carry it); other sizes use the
    mask passed to ``forward``.
    """

    def __init__(
        self,
        dim: int,
        *,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        shift: int,
        mlp_ratio: float,
        drop_path: float,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift > 0:
            self.register_buffer(
                "attn_mask", shifted_window_mask(*input_resolution, window_size, shift)
            )
        else:
            self.register_buffer("attn_mask", None)

    def forward(
        self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x``: ``(B, H*W, C)``; ``size``: ``(H, W)``; ``mask``: the shifted-window mask for
        ``size`` when it is not ``input_resolution`` (``(nW, N, N)``), else None."""
        h, w = size
        b, _, c = x.shape
        ws, s = self.window_size, self.shift
        y = self.norm1(x).view(b, h, w, c)
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
            if mask is None:
                mask = self.attn_mask
        else:
            mask = None
        y = self.attn(window_partition(y, ws), mask)  # (B*nW, ws*ws, C)
        y = window_merge(y, ws, h, w)  # (B, H, W, C)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks, alternately regular and shifted by ``window_size // 2``."""

    def __init__(
        self,
        dim: int,
        *,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution=input_resolution,
                num_heads=num_heads,
                window_size=window_size,
                shift=0 if j % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path[j],
            )
            for j in range(depth)
        )

    def forward(
        self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, size, mask)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer block: ``x + tokens(conv3x3(image(swin_layers(x))))``.

    ``(B, H*W, C)`` tokens in and out; ``residual_group.blocks.*`` and ``conv`` as upstream.
    """

    def __init__(self, dim: int, **layer_kwargs):
        super().__init__()
        self.residual_group = BasicLayer(dim, **layer_kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(
        self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, size, mask).transpose(1, 2).reshape(b, c, *size)
        return x + self.conv(y).flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Patch size 1: ``(B, C, H, W)`` feature map -> ``(B, H*W, C)`` tokens, then LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIR(nn.Module):
    """SwinIR-light (arXiv:2108.10257) with the "pixelshuffledirect" upsampler.

    Args:
        scale: upscaling factor (>= 2; released weights exist for 2, 3, 4).
        img_size: training LR patch side; sets the shape of the stored ``attn_mask`` buffers
            (64 for the released checkpoints). Any input size works regardless.
        embed_dim: feature channels (60).
        depths: Swin layers per RSTB ([6, 6, 6, 6]).
        num_heads: attention heads per RSTB ([6, 6, 6, 6]); each must divide ``embed_dim``.
        window_size: attention window side (8).
        mlp_ratio: MLP hidden width / ``embed_dim`` (2).
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all Swin layers
            (0.1 upstream; only active in training mode).
        img_range: the network works on ``(x - mean) * img_range`` (1.0 upstream).

    Shapes: ``(B, 3, h, w)`` float32 RGB in ``[0, 1]`` -> ``(B, 3, scale*h, scale*w)`` float32,
    roughly in ``[0, 1]`` (not clamped). Any ``h, w >= 1`` (mirror-padded to multiples of
    ``window_size`` inside, output cropped).

    Raises:
        ValueError: ``scale < 2``; ``img_size`` not a multiple of ``window_size`` larger than
            it; ``window_size < 2``; ``depths`` and ``num_heads`` of different lengths; a head
            count that does not divide ``embed_dim``.
    """

    def __init__(
        self,
        scale: int,
        *,
        img_size: int = 64,
        embed_dim: int = 60,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.1,
        img_range: float = 1.0,
    ):
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(n) for n in num_heads]
        if scale < 2:
            raise ValueError(f"scale must be >= 2, got {scale}")
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {window_size}")
        if img_size % window_size or img_size <= window_size:
            raise ValueError(
                f"img_size {img_size} must be a multiple of window_size {window_size} "
                "larger than it"
            )
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        if any(embed_dim % n for n in num_heads):
            raise ValueError(f"num_heads {num_heads} must all divide embed_dim {embed_dim}")
        self.scale = scale
        self.window_size = window_size
        self.img_size = img_size
        self.img_range = img_range
        #: constructor kwargs, saved in checkpoints to rebuild the model
        self.config = dict(
            scale=scale,
            img_size=img_size,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            img_range=img_range,
        )
        self.register_buffer(
            "mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.conv_first = nn.Conv2d(3, embed_dim, 3, padding=1)
        self.patch_embed = PatchEmbed(embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(
                RSTB(
                    embed_dim,
                    input_resolution=(img_size, img_size),
                    depth=depth,
                    num_heads=heads,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    drop_path=rates[start : start + depth],
                )
            )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.upsample = nn.Sequential(
            nn.Conv2d(embed_dim, 3 * scale**2, 3, padding=1), nn.PixelShuffle(scale)
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Upstream init: Linear weights N(0, 0.02) truncated to [-2, 2], zero bias; LayerNorm
        weight 1, bias 0; convolutions keep PyTorch's default."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features: ``(B, C, H, W)`` -> ``(B, C, H, W)``, ``H, W`` multiples of the window."""
        b, c, h, w = x.shape
        mask = None
        if (h, w) != (self.img_size, self.img_size):  # else each block uses its buffer
            shift = self.window_size // 2
            mask = shifted_window_mask(h, w, self.window_size, shift).to(x.device, x.dtype)
        tokens = self.patch_embed(x)  # (B, H*W, C)
        for layer in self.layers:
            tokens = layer(tokens, (h, w), mask)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ws = self.window_size
        x = _mirror_pad(_mirror_pad(x, 2, -h % ws), 3, -w % ws)  # (B, 3, H, W), H, W % ws == 0
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)  # (B, C, H, W)
        x = x + self.conv_after_body(self.forward_features(x))
        x = self.upsample(x)  # (B, 3, s*H, s*W)
        x = x / self.img_range + self.mean
        return x[:, :, : self.scale * h, : self.scale * w]


if __name__ == "__main__":
    net = SwinIR(2).eval()
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        y = net(torch.rand(1, 3, 17, 23))
    print(f"SwinIR-light x2: {n:,} parameters, output {tuple(y.shape)}")
