"""Bits per byte: a language model's quality on a text, comparable across tokenizers.

The total next-token negative log-likelihood of the text, in bits, divided by the text's
UTF-8 byte count. Models with different vocabularies (the base, the donor, a merge with a
union vocabulary) split the same text into different numbers of tokens; per byte, their
numbers compare directly.
"""

from __future__ import annotations

import math

import torch


def start_token_id(model, tokenizer) -> int:
    """The token each window starts with: the tokenizer's bos, else the model's bos, else eos.

    The demo models are trained on windows that start with this token, so every token of the
    text is predicted from some context and counts towards the total.
    """
    for tid in (tokenizer.bos_token_id, getattr(model.config, "bos_token_id", None), tokenizer.eos_token_id):
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no bos or eos token and the model config no bos_token_id")


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, *, max_len: int = 256, batch_size: int = 8,
              start_id: int | None = None) -> torch.Tensor:
    """Next-token NLL (nats) of every id in the 1-D `input_ids`, scored in windows of `max_len`.

    Each window is `[start_id] + up to max_len - 1 ids`, so a token sees the earlier tokens of
    its own window as context (the demo models were trained on windows like these).
    """
    if start_id is None:
        raise ValueError("start_id is required")
    ids = input_ids.reshape(-1).to(torch.long)
    step = max_len - 1
    windows = [ids[i:i + step] for i in range(0, len(ids), step)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for b in range(0, len(windows), batch_size):
            group = windows[b:b + batch_size]
            width = max(len(w) for w in group)
            batch = torch.full((len(group), width + 1), start_id, dtype=torch.long)
            mask = torch.zeros((len(group), width + 1), dtype=torch.long)
            for row, w in enumerate(group):
                batch[row, 1:len(w) + 1] = w
                mask[row, :len(w) + 1] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None].to(device)).squeeze(-1).cpu()
            out.extend(nll[row, :len(w)] for row, w in enumerate(group))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def bits_per_byte(model, tokenizer, text: str, *, max_len: int = 256, batch_size: int = 8) -> float:
    """Total next-token NLL of `text` in bits, divided by its UTF-8 byte count (lower is better).

    The text is tokenized once, without special tokens, and scored in windows of `max_len`
    tokens, each opened by `start_token_id`. Independent of the tokenizer, so a Qwen model and
    a DeepSeek model (or a merge of both) are compared on the same scale.
    """
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        raise ValueError("bits_per_byte of an empty text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    nll = token_nll(model, torch.tensor(ids), max_len=max_len, batch_size=batch_size,
                    start_id=start_token_id(model, tokenizer))
    return float(nll.double().sum()) / math.log(2) / n_bytes
