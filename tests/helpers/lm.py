"""A tiny causal language model, ragged padded token data and its single-process global-token-mean reference.

Sequences have very different lengths (some none at all: all padding) and are right-padded to one fixed
length ``SEQ_LEN``, with targets ``IGNORE_INDEX`` on padding. Every micro-batch has the same shape, so a
micro-batch's per-token losses are bit-for-bit those of the same rows inside the whole batch; only the
weighting differs between a global token mean and a mean of micro-batch means.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

VOCAB = 40
SEQ_LEN = 12
WIDTH = 32
HEADS = 2
IGNORE_INDEX = -100
PAD_ID = 0

# Target-token counts per sequence, [step][rank][micro-batch][sequence], for 2 ranks x accum_steps 3 x 2
# sequences: rank 0 long and rank 1 short sequences, micro-batches from 0 to 24 tokens. Step 1 opens with an
# all-padding micro-batch on rank 1; step 2 ends with one (at the boundary, where the reduction happens).
LENGTHS: list[list[list[list[int]]]] = [
    [[[12, 12], [11, 10], [12, 9]], [[2, 1], [3, 0], [1, 2]]],
    [[[1, 1], [12, 12], [0, 2]], [[0, 0], [12, 11], [5, 0]]],
    [[[6, 12], [2, 1], [12, 12]], [[1, 0], [9, 7], [0, 0]]],
]
WORLD_SIZE = 2
ACCUM_STEPS = 3
MICRO_BATCH = 2
GLOBAL_BATCH = WORLD_SIZE * ACCUM_STEPS * MICRO_BATCH


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        # No qkv bias: a key bias shifts every score of a row equally, so softmax makes its true gradient exactly
        # zero; its float noise would then be blown up to lr-sized steps by Adam in any two summation orders.
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        q, k, v = self.qkv(self.norm1(hidden)).view(batch, length, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        hidden = hidden + self.proj(attended.transpose(1, 2).reshape(batch, length, WIDTH))
        return hidden + self.mlp(self.norm2(hidden))


class TinyLM(nn.Module):
    """Token + position embedding, one transformer block, a final norm and an untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Embedding(SEQ_LEN, WIDTH)
        self.block = Block()
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.block(self.embed(tokens) + self.position(positions))))


def make_lm(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def make_optimizer(params, name: str = "adam") -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=3e-3)
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``IGNORE_INDEX`` (NaN when there are none)."""
    return functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def count_items(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def sequences(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for sequences with ``lengths`` target tokens each, right-padded to ``SEQ_LEN``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (len(lengths), SEQ_LEN + 1), generator=generator)
    inputs = torch.full((len(lengths), SEQ_LEN), PAD_ID)
    targets = torch.full((len(lengths), SEQ_LEN), IGNORE_INDEX)
    for row, length in enumerate(lengths):
        inputs[row, : max(length, 1)] = tokens[row, : max(length, 1)]
        targets[row, :length] = tokens[row, 1 : length + 1]
    return inputs, targets


def micro_batch(step: int, rank: int, index: int, lengths: list = LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of ``rank`` at optimizer step ``step`` (deterministic, the same on every process)."""
    return sequences(lengths[step][rank][index], seed=1000 * step + 10 * rank + index)


def global_batch(
    step: int, micro_batches: list[tuple[int, int]] | None = None, lengths: list = LENGTHS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of ``step``: the listed (rank, index) micro-batches, all of them by default."""
    if micro_batches is None:
        micro_batches = [(r, i) for r in range(len(lengths[step])) for i in range(len(lengths[step][r]))]
    parts = [micro_batch(step, rank, index, lengths) for rank, index in micro_batches]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def reference_run(
    batches: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = torch.float32, optimizer: str = "adam"
) -> tuple[dict[str, torch.Tensor], list[float], list[int]]:
    """One process, one optimizer step per whole batch on the global token-mean loss.

    Returns:
        The final weights, the loss of each step (before it) and each batch's target-token count.
    """
    model = make_lm(dtype)
    opt = make_optimizer(model.parameters(), optimizer)
    losses, counts = [], []
    for inputs, targets in batches:
        opt.zero_grad()
        loss = token_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        counts.append(count_items(targets))
    return {name: value.detach().clone() for name, value in model.state_dict().items()}, losses, counts
