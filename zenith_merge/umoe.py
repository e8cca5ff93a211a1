"""UMoE: attention and FFN layers drawing experts from one shared pool (arXiv 2505.07260).

Multi-head attention, y = sum_h softmax(q_h K_h^T / sqrt(d)) X Wv_h Wo_h, groups as
(a_h X)(Wv_h Wo_h): mix the tokens first, then apply a token-wise two-matrix map. With a
non-linearity between the two matrices that map is an FFN, so attention can route tokens to the
same experts an FFN-MoE layer routes to. In the pre-mixing attention here, a router picks the
top-k experts per token; expert e has its own low-rank query (q_a -> RMSNorm -> q_b), all experts
share one key projection, the values are the raw token states X, and expert e's mixed tokens
a_e X go through expert e's FFN, the one the FFN-MoE layer also uses:

    attention:  y_t = sum_{e in topk(t)} g_{t,e} FFN_e( sum_s a_e[t, s] x_s )
    FFN-MoE:    y_t = sum_{e in topk(t)} g_{t,e} FFN_e( x_t )

`from_attention` converts a transformers attention layer exactly: one expert per head, its FFN
`Wv_g(h)` then `Wo_h` with the identity between, every head active with weight 1, and each head
keeping its own query and key path (q_norm, k_norm, rotary positions, its grouped KV head's
key). Where exactness ends is in `from_attention`'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UMoEConfig:
    """The sizes of a UMoE block: one expert pool, a pre-mixing attention layer and an FFN-MoE layer."""

    hidden: int
    n_experts: int
    expert_inter: int  # each expert's FFN width
    q_rank: int  # low-rank query: hidden -> q_rank -> head_dim
    head_dim: int
    attn_top_k: int
    ffn_top_k: int
    rope_theta: float = 10_000.0
    eps: float = 1e-6

    @classmethod
    def paper_1b(cls) -> UMoEConfig:
        """The paper's 1B configuration: 64 experts of 512, 3 per token in attention, 10 in the FFN."""
        return cls(hidden=2048, n_experts=64, expert_inter=512, q_rank=512, head_dim=128, attn_top_k=3,
                   ffn_top_k=10)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension, computed in float32 (as transformers' RMSNorm)."""
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions: x cos + rotate_half(x) sin (cos, sin broadcast over the head axis)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (batch, seq, dim) for integer positions (batch, seq)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def additive_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """A (batch, 1, seq, seq) additive mask: causal, plus whatever `attention_mask` forbids.

    `attention_mask` may be None (causal only), (batch, seq) with 1 for real tokens, a 4-D boolean
    mask (True: may attend) or a 4-D additive float mask, as transformers passes to attention layers.
    """
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal[None, None].expand(batch, 1, seq, seq)
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        allowed = allowed & attention_mask
    neg = torch.finfo(dtype).min
    mask = torch.zeros(batch, 1, seq, seq, dtype=dtype).masked_fill(~allowed, neg)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
        mask = attention_mask.to(dtype)  # transformers' own additive mask already holds the causal part
    return mask


class ExpertPool(nn.Module):
    """The shared experts: FFN_e(x) = W2_e act(W1_e x), for attention and FFN layers alike."""

    def __init__(self, n_experts: int, hidden: int, inter: int, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, inter, hidden) * hidden ** -0.5)
        self.w2 = nn.Parameter(torch.randn(n_experts, hidden, inter) * inter ** -0.5)
        self.activation = activation

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` on the last dimension of `x`."""
        h = x @ self.w1[e].T
        h = F.silu(h) if self.activation == "silu" else h
        return h @ self.w2[e].T


def route(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Dense gate weights (..., n_experts): softmax over the top-k logits of each token, zero elsewhere."""
    top = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))


class PreMixingAttention(nn.Module):
    """Attention whose heads are experts of a shared pool (module docstring): top-k routed per token."""

    def __init__(self, cfg: UMoEConfig, pool: ExpertPool):
        super().__init__()
        self.cfg, self.pool = cfg, pool
        self.router = nn.Linear(cfg.hidden, cfg.n_experts, bias=False)
        self.q_a = nn.Parameter(torch.randn(cfg.n_experts, cfg.q_rank, cfg.hidden) * cfg.hidden ** -0.5)
        self.q_norm = nn.Parameter(torch.ones(cfg.n_experts, cfg.q_rank))
        self.q_b = nn.Parameter(torch.randn(cfg.n_experts, cfg.head_dim, cfg.q_rank) * cfg.q_rank ** -0.5)
        self.k_proj = nn.Linear(cfg.hidden, cfg.head_dim, bias=False)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = position_embeddings
        gates = route(self.router(x), self.cfg.attn_top_k)  # (b, t, E)
        mask = additive_mask(attention_mask, b, t, x.dtype)[:, 0]
        k = rotate(self.k_proj(x), cos, sin)  # one key for every expert
        out = torch.zeros_like(x)
        for e in torch.nonzero(gates.sum((0, 1))).flatten().tolist():
            q = rms_norm(x @ self.q_a[e].T, self.q_norm[e], self.cfg.eps) @ self.q_b[e].T
            a = ((rotate(q, cos, sin) @ k.transpose(1, 2)) / math.sqrt(self.cfg.head_dim) + mask).softmax(-1)
            out = out + gates[..., e, None] * self.pool(e, a @ x)  # values: the raw token states
        return out


class FFNMoE(nn.Module):
    """The FFN layer routing to the same pool: y_t = sum_{e in topk(t)} g_{t,e} FFN_e(x_t)."""

    def __init__(self, cfg: UMoEConfig, pool: ExpertPool):
        super().__init__()
        self.cfg, self.pool = cfg, pool
        self.router = nn.Linear(cfg.hidden, cfg.n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = route(self.router(x), self.cfg.ffn_top_k)
        out = torch.zeros_like(x)
        for e in torch.nonzero(gates.sum((0, 1))).flatten().tolist():
            out = out + gates[..., e, None] * self.pool(e, x)
        return out


class UMoEBlock(nn.Module):
    """A transformer block of pre-mixing attention and an FFN-MoE, both drawing on one expert pool."""

    def __init__(self, cfg: UMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.pool = ExpertPool(cfg.n_experts, cfg.hidden, cfg.expert_inter)
        self.attn_norm = nn.Parameter(torch.ones(cfg.hidden))
        self.ffn_norm = nn.Parameter(torch.ones(cfg.hidden))
        self.attention = PreMixingAttention(cfg, self.pool)
        self.ffn = FFNMoE(cfg, self.pool)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(rms_norm(x, self.attn_norm, self.cfg.eps), position_embeddings, attention_mask)
        return x + self.ffn(rms_norm(x, self.ffn_norm, self.cfg.eps))


class ConvertedAttention(nn.Module):
    """A standard attention layer in pre-mixing form: one expert per head, every head active.

    Head h is expert h of `pool` (FFN = Wo_h Wv_g(h), identity activation), with its own query
    (q_proj rows, q_norm) and its KV head's key (k_proj rows, k_norm), rotary positions and the
    attention scaling of the original. Called like the original: (hidden_states,
    position_embeddings=(cos, sin), attention_mask) -> (output, None).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                 pool: ExpertPool, kv_of_head: list[int], scaling: float, eps: float):
        super().__init__()
        self.q = nn.Parameter(q)  # (heads, head_dim, hidden)
        self.k = nn.Parameter(k)  # (kv_heads, head_dim, hidden)
        self.q_norm = nn.Parameter(q_norm) if q_norm is not None else None
        self.k_norm = nn.Parameter(k_norm) if k_norm is not None else None
        self.pool, self.kv_of_head, self.scaling, self.eps = pool, kv_of_head, scaling, eps

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **_) -> tuple[torch.Tensor, None]:
        x = hidden_states
        b, t, _ = x.shape
        cos, sin = position_embeddings
        mask = additive_mask(attention_mask, b, t, x.dtype)[:, 0]
        keys = []
        for g in range(self.k.shape[0]):
            k = x @ self.k[g].T
            keys.append(rotate(rms_norm(k, self.k_norm, self.eps) if self.k_norm is not None else k, cos, sin))
        out = torch.zeros_like(x)
        for h, g in enumerate(self.kv_of_head):
            q = x @ self.q[h].T
            q = rotate(rms_norm(q, self.q_norm, self.eps) if self.q_norm is not None else q, cos, sin)
            a = ((q @ keys[g].transpose(1, 2)) * self.scaling + mask).softmax(-1)
            out = out + self.pool(h, a @ x)  # pre-mixing: tokens mixed first, then the head's expert
        return out, None


def from_attention(attn: nn.Module) -> ConvertedAttention:
    """A transformers attention layer (Qwen3Attention, or any with q/k/v/o_proj, head_dim, scaling and
    optional q_norm/k_norm) as a ConvertedAttention computing the same output to float tolerance.

    Exact, by construction: grouped KV heads (each head keeps its group's key, and its expert's first
    matrix is its group's Wv), q/k RMSNorms over the head dimension (Qwen3), rotary positions, causal
    and padding masks. Only the order of the sums changes: (a_h X) Wv^T Wo_h^T instead of
    a_h (X Wv^T) Wo_h^T.
    Not handled: biases on the projections (refused), sliding windows, KV caches, and MLA
    (DeepSeek-V3's latent attention: its values come from a compressed latent through kv_b_proj
    and its keys carry a shared rotary part; writing that as per-head experts is a different
    construction, not done here).
    """
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if getattr(attn, name).bias is not None:
            raise ValueError(f"{type(attn).__name__}.{name} has a bias; the conversion covers bias-free layers")
    if getattr(attn, "sliding_window", None):
        raise ValueError(f"{type(attn).__name__} uses a sliding window; the conversion covers full attention")
    d = attn.head_dim
    hidden = attn.q_proj.in_features
    heads, kv_heads = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    group = heads // kv_heads
    wq = attn.q_proj.weight.detach().view(heads, d, hidden)
    wk = attn.k_proj.weight.detach().view(kv_heads, d, hidden)
    wv = attn.v_proj.weight.detach().view(kv_heads, d, hidden)
    wo = attn.o_proj.weight.detach().view(hidden, heads, d)
    pool = ExpertPool(heads, hidden, d, activation="identity")
    with torch.no_grad():
        pool.w1.copy_(torch.stack([wv[h // group] for h in range(heads)]))  # (heads, d, hidden)
        pool.w2.copy_(wo.permute(1, 0, 2))  # (heads, hidden, d)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    eps = getattr(q_norm, "variance_epsilon", getattr(q_norm, "eps", 1e-6)) if q_norm is not None else 1e-6
    return ConvertedAttention(wq.clone(), wk.clone(), q_norm.weight.detach().clone() if q_norm is not None else None,
                              k_norm.weight.detach().clone() if k_norm is not None else None, pool,
                              [h // group for h in range(heads)], float(attn.scaling), float(eps))
