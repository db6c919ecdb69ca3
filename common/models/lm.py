"""A small decoder-only Transformer language model (nanoGPT-style) that Opacus can train.

Tokenization. Text is character-level by default (``lm.tokenizer = "char"``): a *fixed*
vocabulary of ``"\\n"`` plus printable ASCII (97 ids with ``<unk>``), defined in code
(:meth:`CharTokenizer.default`) rather than learned from data, so every site and the
server build the same model without anyone looking at anyone's text. Any other character
(accented letters, curly quotes...) becomes the one ``<unk>`` token; it is scored like any
other token and never generated. ``lm.tokenizer = "byte"`` uses the 256 UTF-8 bytes instead:
nothing is unknown, at the price of several tokens per non-ASCII character. Either way the
tokenizer is fully determined by the run config (``lm.tokenizer``): it is not saved with the
model's weights, and a reader of them rebuilds it from the run's ``config.json``
(:meth:`LMTask.metadata` describes it).

Architecture. Token + learned position embeddings, ``lm.layers`` pre-LayerNorm blocks of
causal self-attention (``nn.Linear`` projections + ``F.scaled_dot_product_attention``) and a
GELU MLP, a final LayerNorm and an untied output head. Only ``nn.Linear``, ``nn.Embedding``
and ``nn.LayerNorm`` hold weights, so Opacus computes per-sample gradients in every
grad-sample mode (``nn.MultiheadAttention`` does not work under Opacus, and its
``DPMultiheadAttention`` rejects causal masks). Position ids are batch-shaped
(``arange(L).repeat(B, 1)``) because Opacus' embedding grad sampler needs a batch dimension.

Metrics. Losses are in nats per token. The server reports per-*character* perplexity and bits
per character (for the byte tokenizer, characters are counted as the target bytes that start a
UTF-8 sequence), plus, once, ``unigram-perplexity``: the add-one-smoothed character-frequency
model fitted on the evaluated tokens themselves, i.e. the best any model that ignores context
can do on that text. A model below it has learned something from context. The same add-one
model (:func:`unigram_nll`) fitted on one text and scored on another is
:func:`unigram_perplexity`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.config import AppConfig
from common.data.text import TextDataError
from common.data.tokenizers import UNK_ID, CharTokenizer, Tokenizer, make_tokenizer
from common.dp_step import backward_mean, empty_batch_grads, unwrap
from common.tasks import DataSpec, evaluating, sample_labels

log = logging.getLogger(__name__)

# Continuations of these fixed prompts are the per-round text samples (cycled when n > len).
PROMPTS: tuple[str, ...] = (
    "To be, or not to be, ",
    "My lord, ",
    "What say you",
    "O, ",
    "I will not ",
    "The king ",
    "Good morrow, ",
    "Love is ",
)


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    context: int = 64
    layers: int = 2
    heads: int = 4
    width: int = 128


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"lm.width ({width}) must be a multiple of lm.heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, w = x.shape
        q, k, v = (t.reshape(b, length, self.heads, w // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(w, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, length, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only Transformer: ``(B, L)`` token ids -> ``(B, L, vocab)`` next-token logits."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:  # GPT-2 init; residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, length = idx.shape
        if length > self.cfg.context:
            raise ValueError(f"sequence of {length} tokens is longer than lm.context = {self.cfg.context}")
        pos = torch.arange(length, device=idx.device).repeat(b, 1)  # batch-shaped, not expand (Opacus)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _char_counts(targets: torch.Tensor, byte_level: bool) -> int:
    """Characters among target tokens: every token, or the bytes that start a UTF-8 sequence."""
    if not byte_level:
        return targets.numel()
    return int(((targets < 0x80) | (targets >= 0xC0)).sum())


def unigram_nll(counts: torch.Tensor, fitted_on: torch.Tensor | None = None) -> float:
    """Total NLL (nats) of tokens with these per-id ``counts`` under an add-one unigram model.

    The model is fitted on ``fitted_on`` (per-id counts of another text, same vocabulary) or,
    by default, on ``counts`` themselves: ``p(t) = (fit(t) + 1) / (N_fit + V)`` over the ``V``
    ids. The server's baseline uses the default; :func:`unigram_perplexity` the other form.
    """
    counts = counts.to(torch.float64)
    fit = counts if fitted_on is None else fitted_on.to(torch.float64)
    if fit.shape != counts.shape:
        raise ValueError(f"unigram counts over different vocabularies: {tuple(counts.shape)} vs {tuple(fit.shape)}")
    probs = (fit + 1) / (fit.sum() + fit.numel())
    return float(-(counts * probs.log()).sum())


def unigram_perplexity(train_text: str, eval_text: str, tokenizer: Tokenizer) -> float:
    """Per-token perplexity on ``eval_text`` of the add-one unigram model fitted on ``train_text``.

    ``p(t) = (count(t) + 1) / (N + V)`` over the tokenizer's ``V = vocab_size`` ids (see
    :func:`unigram_nll`); the result is ``exp(mean_t -log p(t))`` over the eval tokens.
    """
    eval_ids = tokenizer.encode(eval_text)
    if not eval_ids:
        raise TextDataError("eval_text is empty; unigram perplexity needs at least one token to evaluate")
    size = tokenizer.vocab_size
    fit = torch.bincount(torch.tensor(tokenizer.encode(train_text), dtype=torch.long), minlength=size)
    counts = torch.bincount(torch.tensor(eval_ids, dtype=torch.long), minlength=size)
    return math.exp(unigram_nll(counts, fit) / len(eval_ids))


class LMTask:
    """The language-model family: one module, ``lm``, which sees private data.

    Batches are ``(x, y)`` LongTensor pairs of shape ``(B, lm.context)`` from
    :class:`common.data.text.TokenBlocks`.
    """

    family = "lm"
    private_modules = ("lm",)
    num_classes = 0  # unconditional: sample() takes no labels
    # privacy.grad-sample-mode = "auto" (simulations/bench_dp.py, docs/RESULTS.md#dp-overhead): bk
    # (common/bookkeeping.py): ghost norms and the clipped sum in one backward pass; fastest here.
    grad_sample_mode = "bk"

    def __init__(self, cfg: AppConfig, spec: DataSpec, device: torch.device) -> None:
        if spec.kind != "text":
            raise ValueError("the lm family needs text data; set data.dataset to 'shakespeare' or 'text-folder'")
        self.tokenizer: Tokenizer = make_tokenizer(cfg.lm.tokenizer)
        if spec.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"the data were tokenized with {spec.vocab_size} ids but lm.tokenizer = "
                             f"{cfg.lm.tokenizer!r} has {self.tokenizer.vocab_size}; build both from one config")
        self.spec = spec
        self.device = device
        self.lr = cfg.train.lr
        self.optimizer_name = cfg.train.optimizer
        self.temperature = cfg.lm.temperature
        self.top_k = cfg.lm.top_k
        self.sample_length = cfg.lm.sample_length
        lcfg = LMConfig(spec.vocab_size, cfg.lm.context, cfg.lm.layers, cfg.lm.heads, cfg.lm.width)
        self.modules: dict[str, nn.Module] = {"lm": TinyGPT(lcfg).to(device)}
        log.debug("lm: %s, %d parameters, tokenizer %r", lcfg,
                  sum(p.numel() for p in self.modules["lm"].parameters()), self.tokenizer)

    @property
    def byte_level(self) -> bool:
        return self.tokenizer.kind == "byte"

    def metadata(self) -> dict[str, Any]:
        """What a reader of the saved weights needs besides them: the tokenizer."""
        return {"tokenizer": self.tokenizer.to_config()}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = self.modules["lm"].parameters()
        opt_cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
        return {"lm": opt_cls(params, lr=self.lr)}

    def train_step(
        self, batch: tuple[torch.Tensor, ...], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, float]:
        x, y = batch[0].to(self.device), batch[1].to(self.device)
        opt = optimizers["lm"]
        opt.zero_grad(set_to_none=True)
        if not len(x):
            empty_batch_grads(self.modules["lm"], opt)  # an empty Poisson batch: the DP step adds pure noise
            opt.step()
            return {"train-loss": 0.0, "batch-size": 0.0}
        logits = self.modules["lm"](x)
        # The privacy unit is one window: its loss is the mean over its tokens (all windows have
        # the same length, so the batch mean equals the mean over every token).
        per_window = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="none").view(len(x), -1).mean(1)
        backward_mean(self.modules["lm"], opt, per_window)
        opt.step()
        return {"train-loss": float(per_window.detach().mean()), "batch-size": float(len(x))}

    def _targets(self, loader: Iterable) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            yield batch[0].to(self.device), batch[1].to(self.device)

    @torch.no_grad()
    def evaluate(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """exp(mean NLL) over every target token of the loader, batched; per character. And the share
        of target tokens that are the model's most likely next token (per character with the char
        tokenizer)."""
        model = unwrap(self.modules["lm"])
        was_training = model.training
        model.eval()
        nll = 0.0
        tokens = chars = correct = 0
        for x, y in self._targets(loader):
            logits = model(x)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1),
                                         reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            tokens += y.numel()
            chars += _char_counts(y, self.byte_level)
        model.train(was_training)
        if not tokens:
            raise ValueError("the evaluation loader is empty: no held-out text to score")
        return {
            "perplexity": math.exp(nll / chars),
            "bits-per-char": nll / chars / math.log(2),
            "eval-loss": nll / tokens,
            "next-token-accuracy": correct / tokens,  # the most likely next token is the right one
            "eval-n": float(tokens),
        }

    @torch.no_grad()
    def baseline_metrics(self, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """``unigram-perplexity`` (per character) of the evaluated tokens' own character frequencies."""
        counts = torch.zeros(self.spec.vocab_size, dtype=torch.long)
        chars = 0
        for _, y in self._targets(loader):
            counts += torch.bincount(y.reshape(-1).cpu(), minlength=self.spec.vocab_size)
            chars += _char_counts(y, self.byte_level)
        if not chars:
            raise ValueError("the evaluation loader is empty: no held-out text to score")
        return {"unigram-perplexity": math.exp(unigram_nll(counts) / chars)}

    @torch.no_grad()
    def generate(self, prompt: str, n: int, length: int, generator: torch.Generator) -> list[str]:
        """n continuations of ``length`` tokens after ``prompt`` (temperature, top-k from the config)."""
        model = unwrap(self.modules["lm"])
        was_training = model.training
        model.eval()
        context = model.cfg.context
        ids = self.tokenizer.encode(prompt)[-context:] or [self.tokenizer.encode("\n")[0]]
        seq = torch.tensor([ids] * n, dtype=torch.long, device=self.device)
        for _ in range(length):
            logits = model(seq[:, -context:])[:, -1, :].float() / self.temperature
            if isinstance(self.tokenizer, CharTokenizer):
                logits[:, UNK_ID] = -math.inf  # never write <unk>
            if 0 < self.top_k < logits.shape[-1]:
                kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(self.device)
            seq = torch.cat([seq, nxt], dim=1)
        model.train(was_training)
        return [prompt + self.tokenizer.decode(row[len(ids):]) for row in seq.cpu()]

    canary_score = "next-token cross-entropy"

    @torch.no_grad()
    def canary_losses(self, canaries: torch.Tensor, seed: int) -> torch.Tensor:
        """Each canary window's mean next-token cross-entropy (``seed``: no randomness here)."""
        with evaluating(unwrap(self.modules["lm"])) as lm:
            x = canaries.to(self.device)
            logits = lm(x[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), x[:, 1:].reshape(-1), reduction="none")
            return ce.view(len(x), -1).mean(dim=1).cpu()

    @torch.no_grad()
    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None) -> list[str]:
        """n texts: continuations of the fixed :data:`PROMPTS` (cycled), reproducible for a seed."""
        sample_labels(labels, n, self.num_classes, self.family)  # unconditional: refuses labels
        g = torch.Generator().manual_seed(seed)
        out: list[str] = [""] * n
        for p, prompt in enumerate(PROMPTS):
            slots = list(range(p, n, len(PROMPTS)))
            if slots:
                for i, text in zip(slots, self.generate(prompt, len(slots), self.sample_length, g)):
                    out[i] = text
        return out


def build_task(cfg: AppConfig, spec: DataSpec, device: torch.device) -> LMTask:
    return LMTask(cfg, spec, device)
