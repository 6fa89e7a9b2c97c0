"""SRDD's loss (``srdd_loss``): the diffusion loss, L_simple or improved DDPM's hybrid with the
variational-bound term (``vb_bits``, ``posterior_tables``), plus the two memory-bank terms
(``MemoryBank``). Equations: the package docstring (``srdistill.distill.diffusion``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "posterior_tables",
    "q_posterior",
    "srdd_loss",
    "vb_bits",
    "MemoryBank",
]


class MemoryBank:
    """Per-cluster FIFO memories of SRDD's loss: ``size`` flattened real samples and ``size``
    detached predictions per cluster, float32 on the device of the samples."""

    def __init__(self, num_clusters: int, size: int):
        self.size = size
        self.real: list[torch.Tensor | None] = [None] * num_clusters
        self.pred: list[torch.Tensor | None] = [None] * num_clusters

    def push(self, bank: list, cluster: int, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        old = bank[cluster]
        bank[cluster] = rows[-self.size :] if old is None else torch.cat([old, rows])[-self.size :]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("real", "pred"):
            for c, t in enumerate(getattr(self, name)):
                if t is not None:
                    out[f"{name}.{c}"] = t.cpu()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        for key, t in state.items():
            name, c = key.split(".")
            getattr(self, name)[int(c)] = t.to(device)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats:
    0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1).
    Tensors broadcast; float in, float out."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the approximation
    improved DDPM's decoder likelihood uses (absolute error < 2e-4). Elementwise, in [0, 1]."""
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, in nats, of N(means, exp(log_scales)^2) discretised to 256 bins of
    width 2/255 centred on data ``x`` in [-1, 1] (Ho et al. 2020, Eq. 13; the decoder L_0 of
    improved DDPM): log(Phi(z+) - Phi(z-)) with z+- = (x - mean +- 1/255) / scale, and the
    edge bins open (x < -0.999: log Phi(z+); x > 0.999: log(1 - Phi(z-))); Phi is
    ``approx_standard_normal_cdf``, probabilities clamped at 1e-12. Shapes must match.

    Raises:
        ValueError: the shapes differ.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x {tuple(x.shape)}, means {tuple(means.shape)} and log_scales "
                         f"{tuple(log_scales.shape)} must have one shape")  # fmt: skip
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def posterior_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 ``(T,)`` tables of the DDPM forward process with ``betas`` (``(T,)``, in (0, 1]),
    for ``q_posterior`` and ``vb_bits`` (Ho et al. 2020, Eq. 6-7):

    ``alphas_cumprod`` a_t, ``posterior_variance`` beta~_t = beta_t (1 - a_{t-1}) / (1 - a_t),
    ``posterior_log_variance_clipped`` (log beta~_t, with beta~_1 in place of beta~_0 = 0, as
    improved DDPM), ``posterior_mean_coef1`` beta_t sqrt(a_{t-1}) / (1 - a_t),
    ``posterior_mean_coef2`` (1 - a_{t-1}) sqrt(1 - beta_t) / (1 - a_t) and ``log_betas``.

    Raises:
        ValueError: ``betas`` not 1-D with at least 2 entries in (0, 1].
    """
    betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
    if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("betas must be 1-D, at least 2 steps, each in (0, 1]")
    a = torch.cumprod(1.0 - betas, 0)
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    var = betas * (1.0 - a_prev) / (1.0 - a)
    return {"alphas_cumprod": a, "posterior_variance": var,
            "posterior_log_variance_clipped": torch.log(torch.cat([var[1:2], var[1:]])),
            "posterior_mean_coef1": betas * a_prev.sqrt() / (1.0 - a),
            "posterior_mean_coef2": (1.0 - a_prev) * (1.0 - betas).sqrt() / (1.0 - a),
            "log_betas": torch.log(betas)}  # fmt: skip


def _at(tables: dict[str, torch.Tensor], name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tables[name][t]`` as float32 on ``like``'s device, shaped to broadcast over ``like``."""
    return tables[name].to(like.device)[t].float().view(-1, *[1] * (like.ndim - 1))


def q_posterior(tables: dict[str, torch.Tensor], x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020,
    Eq. 6-7): mean = coef1_t x0 + coef2_t x_t, variance beta~_t (``posterior_tables``).
    ``x0``, ``x_t``: ``(B, ...)`` float; ``t``: ``(B,)`` int64 in [0, T). The variances are
    ``(B, 1, ...)`` (broadcast over the sample)."""
    mean = _at(tables, "posterior_mean_coef1", t, x_t) * x0 + _at(tables, "posterior_mean_coef2", t, x_t) * x_t
    return (mean, _at(tables, "posterior_variance", t, x_t),
            _at(tables, "posterior_log_variance_clipped", t, x_t))  # fmt: skip


def vb_bits(tables: dict[str, torch.Tensor], eps_hat: torch.Tensor, v: torch.Tensor, x0: torch.Tensor,
            x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Improved DDPM's variational-bound term L_t of each sample, in bits per dimension
    (Nichol & Dhariwal, arXiv 2102.09672, §3.1), with learned variance and a frozen mean.

    The model's p(x_{t-1} | x_t) has mean mu(x_t, x0_hat), the posterior mean at
    x0_hat = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps_hat (not clipped), with ``eps_hat``
    detached (so L_t trains only ``v``), and log variance
    frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (Eq. 15). L_t is the KL from
    the true posterior (``q_posterior``) for t > 0 and the discretised decoder NLL of ``x0``
    (``discretized_gaussian_log_likelihood``) at t = 0, averaged over all non-batch dimensions
    and divided by ln 2.

    Args:
        tables: ``posterior_tables`` of the training schedule.
        eps_hat, v: ``(B, C, ...)`` float: noise prediction and variance channels of the model.
        x0, x_t: ``(B, C, ...)`` float: clean and noisy samples.
        t: ``(B,)`` int64 timesteps in [0, T).

    Returns:
        ``(B,)`` float32, bits per dimension.
    """
    eps_hat, v, x0, x_t = eps_hat.detach().float(), v.float(), x0.float(), x_t.float()
    a = _at(tables, "alphas_cumprod", t, x_t)
    x0_hat = (1.0 / a).sqrt() * x_t - (1.0 / a - 1.0).sqrt() * eps_hat
    model_mean, _, _ = q_posterior(tables, x0_hat, x_t, t)
    frac = (v + 1.0) / 2.0
    min_log = _at(tables, "posterior_log_variance_clipped", t, x_t)
    max_log = _at(tables, "log_betas", t, x_t)
    model_logvar = frac * max_log + (1.0 - frac) * min_log
    true_mean, _, true_logvar = q_posterior(tables, x0, x_t, t)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / np.log(2.0)
    return torch.where(t.to(x_t.device) == 0, nll, kl)


def srdd_loss(eps_hat: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
              alpha_bar: torch.Tensor, labels: torch.Tensor, memory: MemoryBank | None,
              lambda_pos: float, lambda_neg: float, *, vb: torch.Tensor | None = None,
              reduce: str = "sample") -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """SRDD's fine-tuning loss (see the module docstring) for one batch; updates ``memory``.

    Args:
        eps_hat, noise, x_t, x0: ``(B, C, h, w)`` float: prediction, true noise, noisy and
            clean samples.
        alpha_bar: ``(B,)`` cumulative alpha of each sample's timestep.
        labels: ``(B,)`` cluster ids of the memory terms; ids >= the number of banks (the null
            class) get none.
        memory: the banks, or ``None`` for the diffusion loss only.
        vb: ``(B,)`` per-sample L_t in bits (``vb_bits``) of the hybrid loss, added as its
            batch mean; ``None`` for L_simple alone.
        reduce: ``"sample"``: each sample's 1 - min / max cosine similarity to its cluster's
            memory, averaged over the samples with memory; ``"cluster"`` (SRDD's release): per
            cluster in the batch the 1 - min / max over all its (sample, memory) pairs, summed
            and divided by the number of clusters in the batch (those without memory yet
            count, adding 0).

    Returns:
        (loss scalar, {"simple", "vb", "pos", "neg"} floats).

    Raises:
        ValueError: unknown ``reduce``.
    """
    if reduce not in ("sample", "cluster"):
        raise ValueError(f"finetune.memory_reduce must be 'sample' or 'cluster', got {reduce!r}")
    simple = F.mse_loss(eps_hat.float(), noise.float())
    parts = {"simple": float(simple.detach()), "vb": 0.0, "pos": 0.0, "neg": 0.0}
    loss = simple
    if vb is not None:
        vb_mean = vb.float().mean()
        loss = loss + vb_mean
        parts["vb"] = float(vb_mean.detach())
    if memory is None or (lambda_pos == 0 and lambda_neg == 0):
        return loss, parts
    a = alpha_bar.view(-1, 1, 1, 1).float()
    x0_hat = ((x_t.float() - (1 - a).sqrt() * eps_hat.float()) / a.sqrt()).flatten(1)
    pos_terms, neg_terms = [], []
    clusters = [c for c in labels.unique().tolist() if c < len(memory.real)]
    for c in clusters:
        rows = labels == c
        pred = F.normalize(x0_hat[rows], dim=1)
        if memory.real[c] is not None:
            sim = pred @ F.normalize(memory.real[c], dim=1).T
            pos_terms.append(1 - (sim.min(1).values if reduce == "sample" else sim.min().view(1)))
        if memory.pred[c] is not None:
            sim = pred @ F.normalize(memory.pred[c], dim=1).T
            neg_terms.append(sim.max(1).values if reduce == "sample" else sim.max().view(1))
        memory.push(memory.real, c, x0[rows].flatten(1))
        memory.push(memory.pred, c, x0_hat[rows])
    for name, terms, weight in (("pos", pos_terms, lambda_pos), ("neg", neg_terms, lambda_neg)):
        if terms:
            term = torch.cat(terms).mean() if reduce == "sample" else torch.cat(terms).sum() / len(clusters)
            loss = loss + weight * term
            parts[name] = float(term.detach())
    return loss, parts
