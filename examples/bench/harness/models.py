"""The benchmark's models and data: a communication-heavy MLP and an activation-heavy token transformer.

Every batch is a pure function of (seed, optimizer step, rank, micro-step), so every method of the benchmark
sees exactly the same data in the same order, and ranks see disjoint slices of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One benchmark model: how to build it, its data and its loss."""

    name: str
    """``mlp`` or ``transformer``."""
    size: str
    """``full`` (the README's figures) or ``tiny`` (smoke tests)."""
    default_micro_batch_size: int
    """Samples per micro-batch when the command line does not say."""
    build: Callable[[], nn.Module]
    """A fresh model; call under ``torch.manual_seed`` for identical weights everywhere."""
    batch: Callable[[torch.Generator, int], Batch]
    """``batch(generator, micro_batch_size)``: one micro-batch (inputs, targets) on the CPU."""
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """Mean loss over the batch's items (samples, or tokens that are not padding)."""
    num_items: Callable[[torch.Tensor], int]
    """Items the loss of a batch averages over, from its targets (for ``backward(num_items=)``)."""
    description: str
    """One line for tables: parameters and shapes."""


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(outputs, targets)


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _samples(targets: torch.Tensor) -> int:
    return int(targets.shape[0])


def _tokens(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def mlp_spec(size: str = "full") -> ModelSpec:
    """An MLP of 16.8M parameters (``full``): little compute per sample, a large gradient to reduce."""
    width, hidden, layers = (1024, 2048, 3) if size == "full" else (16, 32, 1)

    def build() -> nn.Module:
        blocks: list[nn.Module] = [nn.Linear(width, hidden), nn.GELU()]
        for _ in range(layers):
            blocks += [nn.Linear(hidden, hidden), nn.GELU()]
        return nn.Sequential(*blocks, nn.Linear(hidden, width))

    def batch(generator: torch.Generator, micro_batch_size: int) -> Batch:
        inputs = torch.randn(micro_batch_size, width, generator=generator)
        return inputs, torch.tanh(inputs.roll(1, dims=1)) + 0.1 * torch.randn(
            micro_batch_size, width, generator=generator
        )

    params = width * hidden + hidden + layers * (hidden * hidden + hidden) + hidden * width + width
    return ModelSpec(
        name="mlp",
        size=size,
        default_micro_batch_size=8,
        build=build,
        batch=batch,
        loss=_mse,
        num_items=_samples,
        description=f"MLP {width}-{hidden}x{layers + 1}-{width}, {params / 1e6:.1f}M parameters, MSE",
    )


class TokenTransformer(nn.Module):
    """A small causal transformer over token sequences (pre-norm encoder layers with a causal mask)."""

    mask: torch.Tensor

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


def transformer_spec(size: str = "full") -> ModelSpec:
    """A causal transformer over 128-token sequences (``full``): activations dominate memory.

    Sequences have ragged lengths (padding is ignored by the loss), so ``num_items`` (tokens) matters.
    """
    vocab, seq_len, d_model, heads, layers = (512, 128, 128, 4, 2) if size == "full" else (32, 8, 16, 2, 1)

    def build() -> nn.Module:
        return TokenTransformer(vocab, seq_len, d_model, heads, layers)

    def batch(generator: torch.Generator, micro_batch_size: int) -> Batch:
        # A learnable rule (next token = previous + 1 mod vocab, from random starts) with ragged lengths.
        starts = torch.randint(0, vocab, (micro_batch_size, 1), generator=generator)
        sequence = (starts + torch.arange(seq_len + 1)) % vocab
        lengths = torch.randint(seq_len // 2, seq_len + 1, (micro_batch_size, 1), generator=generator)
        targets = sequence[:, 1:].clone()
        targets[torch.arange(seq_len) >= lengths] = IGNORE_INDEX
        return sequence[:, :-1], targets

    probe = build()
    params = sum(p.numel() for p in probe.parameters())
    return ModelSpec(
        name="transformer",
        size=size,
        default_micro_batch_size=8,
        build=build,
        batch=batch,
        loss=_token_loss,
        num_items=_tokens,
        description=(
            f"causal transformer, {layers} layers, d_model {d_model}, {seq_len} tokens (ragged), vocab {vocab}, "
            f"{params / 1e6:.2f}M parameters, cross-entropy"
        ),
    )


MODELS: dict[str, Callable[[str], ModelSpec]] = {"mlp": mlp_spec, "transformer": transformer_spec}
"""Benchmark models by name."""


def model_spec(name: str, size: str = "full") -> ModelSpec:
    """The :class:`ModelSpec` called ``name`` at ``size``.

    Raises:
        ValueError: unknown model name or size.
    """
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not a benchmark model; choose from {', '.join(MODELS)}")
    if size not in ("full", "tiny"):
        raise ValueError(f"size {size!r} must be 'full' or 'tiny'")
    return MODELS[name](size)


def round_batches(
    spec: ModelSpec, *, seed: int, step: int, rank: int, micro_batch_size: int, accum_steps: int
) -> list[Batch]:
    """This rank's ``accum_steps`` micro-batches of optimizer step ``step`` (identical for every method)."""
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 10_007)
    return [spec.batch(generator, micro_batch_size) for _ in range(accum_steps)]
