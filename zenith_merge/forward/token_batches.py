"""Training batches from texts: consecutive tokens cut into sequences and drawn with a seeded generator,
for router and map training and for the UMoE demo."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError


def token_batches(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int, steps: int,
                  seed: int, *, where: str = "the training text") -> list[torch.Tensor]:
    """`steps` batches (batch_size, seq_len) of consecutive tokens from the texts, picked with a seeded generator.

    `where` names the config key the texts come from, for the error when they cannot fill one sequence.
    """
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, verbose=False)["input_ids"]  # long texts are cut into sequences below
    if len(ids) < seq_len:
        raise ConfigError(f"{where}: {len(ids)} tokens in all, but training needs at least one sequence of "
                          f"router.seq_len = {seq_len} tokens; name more text there (files or demo:code / demo:maths)")
    n = len(ids) // seq_len
    chunks = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    gen = torch.Generator().manual_seed(seed)
    return [chunks[torch.randint(0, n, (batch_size,), generator=gen)] for _ in range(steps)]
