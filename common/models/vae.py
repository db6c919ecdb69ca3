"""A small convolutional VAE that Opacus can train (GroupNorm, no BatchNorm).

Bernoulli likelihood on pixels in [0, 1]; every loss is in nats per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import AppConfig
from common.models import norm_groups
from common.dp_step import backward_mean, empty_batch_grads, unwrap
from common.tasks import DataSpec, evaluating, sample_labels


@dataclass(frozen=True)
class VAEConfig:
    image_size: int
    channels: int = 1
    latent_dim: int = 16
    width: int = 32


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, c = cfg.width, cfg.channels
        self.s1 = math.ceil(cfg.image_size / 2)
        self.s2 = math.ceil(self.s1 / 2)
        flat = 2 * w * self.s2 * self.s2
        self.encoder = nn.Sequential(
            nn.Conv2d(c, w, 3, stride=2, padding=1),
            nn.GroupNorm(norm_groups(w), w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.GroupNorm(norm_groups(2 * w), 2 * w),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(flat, 2 * cfg.latent_dim),
        )
        self.decoder_in = nn.Linear(cfg.latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.Upsample(size=(self.s1, self.s1), mode="nearest"),
            nn.Conv2d(2 * w, w, 3, padding=1),
            nn.GroupNorm(norm_groups(w), w),
            nn.SiLU(),
            nn.Upsample(size=(cfg.image_size, cfg.image_size), mode="nearest"),
            nn.Conv2d(w, c, 3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits."""
        h = self.decoder_in(z).view(-1, 2 * self.cfg.width, self.s2, self.s2)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n images in [0, 1] decoded from the prior; the same seed gives the same latents."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.latent_dim, generator=g).to(next(self.parameters()).device)
        return torch.sigmoid(self.decode(z))


def per_example_loss(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction NLL, KL) per example, in nats."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return recon, kl


CANARY_DRAWS = 8  # fixed latent noise draws averaged per canary loss


class VAETask:
    """The VAE family: one module, ``vae``, which sees private data."""

    family = "vae"
    private_modules = ("vae",)
    num_classes = 0  # unconditional: sample() takes no labels
    # privacy.grad-sample-mode = "auto" (simulations/bench_dp.py, docs/RESULTS.md#dp-overhead): bk
    # (common/bookkeeping.py): one backward pass, per-example gradients only for convs and norms; fastest here.
    grad_sample_mode = "bk"

    def __init__(self, cfg: AppConfig, spec: DataSpec, device: torch.device) -> None:
        if spec.kind != "image":
            raise ValueError("the vae family needs image data; set data.dataset to an image dataset")
        self.spec = spec
        self.device = device
        self.lr = cfg.train.lr
        self.optimizer_name = cfg.train.optimizer
        vcfg = VAEConfig(spec.image_size, spec.channels, cfg.vae.latent_dim, cfg.vae.width)
        self.modules: dict[str, nn.Module] = {"vae": VAE(vcfg).to(device)}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = self.modules["vae"].parameters()
        opt_cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
        return {"vae": opt_cls(params, lr=self.lr)}

    def train_step(
        self, batch: tuple[torch.Tensor, ...], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, float]:
        x = batch[0].to(self.device)
        opt = optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        if not len(x):
            empty_batch_grads(self.modules["vae"], opt)  # an empty Poisson batch: the DP step adds pure noise
            opt.step()
            return {"train-loss": 0.0, "batch-size": 0.0}
        logits, mu, logvar = self.modules["vae"](x)
        recon, kl = per_example_loss(logits, x, mu, logvar)
        per_example = recon + kl
        backward_mean(self.modules["vae"], opt, per_example)
        opt.step()
        return {"train-loss": float(per_example.detach().mean()), "batch-size": float(len(x))}

    @torch.no_grad()
    def evaluate(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        vae = unwrap(self.modules["vae"])
        vae.eval()
        g = torch.Generator().manual_seed(0)
        tot_recon = tot_kl = 0.0
        n = 0
        for batch in loader:
            x = batch[0].to(self.device)
            eps = torch.randn(len(x), vae.cfg.latent_dim, generator=g).to(self.device)
            logits, mu, logvar = vae(x, eps)
            recon, kl = per_example_loss(logits, x, mu, logvar)
            tot_recon += float(recon.sum())
            tot_kl += float(kl.sum())
            n += len(x)
        vae.train()
        return {
            "neg-elbo": (tot_recon + tot_kl) / n,
            "recon-nll": tot_recon / n,
            "kl": tot_kl / n,
            "eval-n": float(n),
        }

    canary_score = "negative ELBO"

    @torch.no_grad()
    def canary_losses(self, canaries: torch.Tensor, seed: int) -> torch.Tensor:
        """The negative ELBO of each canary, averaged over fixed latent noise draws from ``seed``."""
        with evaluating(unwrap(self.modules["vae"])) as module:
            x = canaries.to(self.device)
            g = torch.Generator().manual_seed(seed)
            total = torch.zeros(len(x), dtype=torch.float64)
            for _ in range(CANARY_DRAWS):
                eps = torch.randn(len(x), module.cfg.latent_dim, generator=g).to(self.device)
                logits, mu, logvar = module(x, eps)
                recon, kl = per_example_loss(logits, x, mu, logvar)
                total += (recon + kl).double().cpu()
        return total / CANARY_DRAWS

    @torch.no_grad()
    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """n images in [0, 1] decoded from the prior; the same seed gives the same images."""
        sample_labels(labels, n, self.num_classes, self.family)  # unconditional: refuses labels
        vae = unwrap(self.modules["vae"])
        vae.eval()
        out = vae.sample(n, seed)
        vae.train()
        return out.cpu()


def build_task(cfg: AppConfig, spec: DataSpec, device: torch.device) -> VAETask:
    return VAETask(cfg, spec, device)
