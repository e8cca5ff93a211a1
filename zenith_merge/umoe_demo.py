"""`zenith-merge umoe-demo`: a tiny UMoE language model against a parameter-matched standard MoE,
trained alike on the demo code corpus on CPU, compared in held-out bits per byte.

Both models: embeddings (tied to the head), `layers` blocks, a final RMSNorm. UMoE blocks share one
expert pool between pre-mixing attention and the FFN-MoE (zenith_merge.umoe). The baseline's blocks
have standard multi-head attention and an FFN-MoE with experts of its own; its expert count is
chosen so that the two models have the same number of parameters (to within one expert). Same
tokenizer (zen-tiny's), data, steps, batches, learning rate and seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .umoe import ExpertPool, FFNMoE, UMoEBlock, UMoEConfig, additive_mask, rms_norm, rope_tables, rotate


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and training of the demo (defaults: a few minutes on 2 CPU cores)."""

    layers: int = 2
    hidden: int = 96
    n_experts: int = 8
    expert_inter: int = 192
    q_rank: int = 48
    head_dim: int = 32
    heads: int = 3  # the baseline's attention heads (heads x head_dim = hidden)
    attn_top_k: int = 2
    ffn_top_k: int = 2
    steps: int = 300
    batch: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    train_chars: int = 400_000
    seed: int = 0


class StandardBlock(nn.Module):
    """Multi-head attention (rotary, causal) and an FFN-MoE with its own experts."""

    def __init__(self, cfg: UMoEConfig, heads: int, n_experts: int):
        super().__init__()
        self.cfg, self.heads = cfg, heads
        h = cfg.hidden
        self.qkv = nn.Linear(h, 3 * heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(heads * cfg.head_dim, h, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.ffn_norm = nn.Parameter(torch.ones(h))
        ffn_cfg = replace(cfg, n_experts=n_experts)
        self.ffn = FFNMoE(ffn_cfg, ExpertPool(n_experts, h, cfg.expert_inter))
        self.pool = self.ffn.pool

    def forward(self, x, position_embeddings, attention_mask=None):
        b, t, _ = x.shape
        cos, sin = position_embeddings
        q, k, v = self.qkv(rms_norm(x, self.attn_norm, self.cfg.eps)).view(b, t, 3, self.heads, -1).unbind(2)
        q, k = (rotate(z.transpose(1, 2), cos[:, None], sin[:, None]) for z in (q, k))
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(self.cfg.head_dim)
             + additive_mask(attention_mask, b, t, x.dtype)).softmax(-1)
        x = x + self.o((a @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, -1))
        return x + self.ffn(rms_norm(x, self.ffn_norm, self.cfg.eps))


class TinyLM(nn.Module):
    """Embeddings, blocks, a final norm and a tied head; `forward` returns an object with `.logits`."""

    def __init__(self, vocab: int, cfg: UMoEConfig, blocks: list[nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.config = SimpleNamespace(bos_token_id=None)  # what bits_per_byte asks a model (the tokenizer's serves)
        self.embed = nn.Embedding(vocab, cfg.hidden)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Parameter(torch.ones(cfg.hidden))

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        rope = rope_tables(torch.arange(t)[None].expand(b, t), self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, rope, attention_mask)
        return SimpleNamespace(logits=rms_norm(x, self.norm, self.cfg.eps) @ self.embed.weight.T)


def count(model: nn.Module) -> int:
    """Parameters, each shared tensor once."""
    return sum(p.numel() for p in model.parameters())


def build_models(vocab: int, s: DemoSettings) -> tuple[TinyLM, TinyLM]:
    """(UMoE model, standard MoE model with the expert count that matches its parameters)."""
    cfg = UMoEConfig(hidden=s.hidden, n_experts=s.n_experts, expert_inter=s.expert_inter, q_rank=s.q_rank,
                     head_dim=s.head_dim, attn_top_k=s.attn_top_k, ffn_top_k=s.ffn_top_k)
    torch.manual_seed(s.seed)
    umoe = TinyLM(vocab, cfg, [UMoEBlock(cfg) for _ in range(s.layers)])
    torch.manual_seed(s.seed)
    probe = TinyLM(vocab, cfg, [StandardBlock(cfg, s.heads, 1) for _ in range(s.layers)])
    per_expert = 2 * s.hidden * s.expert_inter + s.hidden  # its FFN and its router column
    extra = (count(umoe) - count(probe)) // (s.layers * per_expert)
    torch.manual_seed(s.seed)
    baseline = TinyLM(vocab, cfg, [StandardBlock(cfg, s.heads, 1 + extra) for _ in range(s.layers)])
    return umoe, baseline


def train(model: TinyLM, batches: list[torch.Tensor], lr: float, progress: bool, desc: str) -> list[float]:
    """AdamW on next-token loss over `batches`, cosine decay; the loss per step."""
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    model.train()
    for step, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        for group in optim.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, len(batches)))))
        logits = model(batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def run_demo(settings: DemoSettings = DemoSettings(), *, progress: bool = True) -> dict:
    """Train both models alike and measure them; returns the numbers the report prints."""
    from transformers import AutoTokenizer

    from .demo import bits_per_byte, corpus, ensure_demo, heldout_text
    from .forward.token_batches import token_batches

    torch.manual_seed(settings.seed)
    tok = AutoTokenizer.from_pretrained(ensure_demo("zen-tiny", progress=progress))
    windows = token_batches(tok, [corpus("code", "train", settings.train_chars)], settings.seq_len - 1,
                            settings.batch, settings.steps, settings.seed)
    bos = torch.full((settings.batch, 1), tok.bos_token_id, dtype=torch.long)
    batches = [torch.cat([bos, w], dim=1) for w in windows]  # each window opens with bos, as it is scored
    umoe, baseline = build_models(len(tok), settings)
    text = heldout_text("code")
    out = {"settings": settings.__dict__, "heldout_bytes": len(text.encode())}
    for name, model in (("umoe", umoe), ("standard_moe", baseline)):
        t0 = time.perf_counter()
        losses = train(model, batches, settings.lr, progress, name)
        with torch.no_grad():
            bpb = bits_per_byte(model, tok, text, max_len=settings.seq_len)
        out[name] = {"parameters": count(model), "experts_per_layer": model.blocks[0].pool.w1.shape[0],
                     "final_loss": sum(losses[-20:]) / len(losses[-20:]), "heldout_bpb": bpb,
                     "seconds": time.perf_counter() - t0}
    return out


def format_demo(result: dict) -> str:
    """The demo's markdown table."""
    lines = ["| model | parameters | experts per layer | train loss (last 20 steps) | held-out code bpb | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("umoe", "standard_moe"):
        r = result[name]
        lines.append(f"| {name} | {r['parameters']:,} | {r['experts_per_layer']} | {r['final_loss']:.4f} | "
                     f"{r['heldout_bpb']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)
