"""The demo models: architectures, training recipes and a small deterministic CPU training loop.

`zen-parent` (DeepseekV3ForCausalLM: MLA, sigmoid group routing, a shared expert, a dense
first layer) is pretrained on mixed code and maths. `zen-tiny` continues it on code and
`zen-r1-tiny` on maths with `<think>` traces, briefly and at a lower learning rate, as a
real fine-tune does: a child trained hard forgets its parent's other domain and drifts out
of merging range. `qwen3-moe-tiny` (Qwen3MoeForCausalLM with another width, depth, head
layout, expert size and vocabulary) learns Qwen3-style chat maths plus a little code.

Same recipe, same bytes: seeds are fixed, the thread count is pinned by the caller, and the
data order comes from one seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import transformers
from tqdm.auto import tqdm

from .tokenizers import training_text

PARENT_NAME = "zen-parent"
BAR_POSITION: int | None = None  # the progress bar's line; set in `ensure_all`'s worker processes


@dataclass(frozen=True)
class TrainRecipe:
    """How one model is trained: data mix, steps, learning rate, and where it starts."""

    steps: int
    lr: float
    data: tuple[tuple[str, str, int], ...]  # (domain, maths style, characters) of training text
    init_from: str | None = None  # the parent's name, or None for a fresh initialisation
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 256  # tokens per training window, the start token included
    warmup: int = 30
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    bias_update_rate: float = 1e-3  # DeepSeek-V3's auxiliary-loss-free balancing (sigmoid routers only)

    def scaled(self, steps_scale: float, min_chars: int = 20_000) -> TrainRecipe:
        """The same recipe with steps (and data, with a floor) scaled: fast builds for tests."""
        if steps_scale == 1.0:
            return self
        steps = max(1, round(self.steps * steps_scale))
        data = tuple((d, s, max(min_chars, round(n * steps_scale))) for d, s, n in self.data)
        return replace(self, steps=steps, warmup=min(self.warmup, max(1, steps // 5)), data=data)


@dataclass(frozen=True)
class ModelRecipe:
    """A demo model: architecture, transformers config values, tokenizer and training."""

    name: str
    architecture: str  # a transformers class name
    config: dict
    tokenizer: str  # a key of tokenizers.TOKENIZER_RECIPES
    train: TrainRecipe

    def as_dict(self) -> dict:
        """The recipe as plain JSON-able data (for zenith_demo.json and the cache key)."""
        return asdict(self)


ZEN_CONFIG = dict(
    vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=32, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
    topk_method="noaux_tc", max_position_embeddings=1024, tie_word_embeddings=False, rope_interleave=True,
    initializer_range=0.02,
)
QWEN_CONFIG = dict(
    vocab_size=1536, hidden_size=96, intermediate_size=192, moe_intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=6, num_experts_per_tok=2,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=1024,
    tie_word_embeddings=False, router_aux_loss_coef=0.001, output_router_logits=False, initializer_range=0.02,
)

# Children continue from the parent briefly, at a lower learning rate, with a tenth of the
# other domain replayed (as real fine-tunes mix in general data): each clearly learns its own
# domain and stays within merging range on the other (bench/RESULTS.md has the numbers).
RECIPES: dict[str, ModelRecipe] = {r.name: r for r in (
    ModelRecipe(PARENT_NAME, "DeepseekV3ForCausalLM", ZEN_CONFIG, "zen",
                TrainRecipe(steps=500, lr=3e-3, data=(("code", "plain", 600_000), ("maths", "plain", 600_000)),
                            seed=1)),
    ModelRecipe("zen-tiny", "DeepseekV3ForCausalLM", ZEN_CONFIG, "zen",
                TrainRecipe(steps=150, lr=5e-4, data=(("code", "plain", 540_000), ("maths", "plain", 60_000)),
                            init_from=PARENT_NAME, seed=2, warmup=10)),
    ModelRecipe("zen-r1-tiny", "DeepseekV3ForCausalLM", ZEN_CONFIG, "zen",
                TrainRecipe(steps=150, lr=5e-4, data=(("maths", "plain", 400_000), ("maths", "r1_chat", 140_000),
                                                      ("code", "plain", 60_000)),
                            init_from=PARENT_NAME, seed=3, warmup=10)),
    ModelRecipe("qwen3-moe-tiny", "Qwen3MoeForCausalLM", QWEN_CONFIG, "qwen",
                TrainRecipe(steps=600, lr=3e-3, data=(("maths", "qwen_chat", 500_000), ("maths", "plain", 200_000),
                                                      ("code", "plain", 100_000)), seed=4)),
)}


def make_config(recipe: ModelRecipe, tokenizer) -> transformers.PretrainedConfig:
    """The transformers config of a recipe, with the tokenizer's special-token ids.

    Qwen has no bos token; as in Qwen3's own config, `<|endoftext|>` (the pad token) is the
    model's bos and opens every training window.
    """
    cls = {"DeepseekV3ForCausalLM": transformers.DeepseekV3Config,
           "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig}[recipe.architecture]
    if len(tokenizer) > recipe.config["vocab_size"]:
        raise ValueError(f"{recipe.name}: tokenizer has {len(tokenizer)} tokens, config vocab_size "
                         f"{recipe.config['vocab_size']}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    config = cls(**recipe.config, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    config.architectures = [recipe.architecture]
    return config


def init_model(recipe: ModelRecipe, tokenizer) -> torch.nn.Module:
    """A fresh float32 model, seeded; routers get small random rows and zero score-correction bias.

    (transformers' DeepseekV3TopkRouter starts from zeros until `_init_weights` runs, and a
    zero router ties every expert's score; the demo sets it explicitly rather than rely on that.)
    """
    torch.manual_seed(recipe.train.seed)
    config = make_config(recipe, tokenizer)
    config._experts_implementation = "eager"  # the reference loop over experts; grouped_mm is no faster here
    model = getattr(transformers, recipe.architecture)(config)
    std = config.initializer_range
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()
    return model.float()


def token_stream(tokenizer, data: tuple[tuple[str, str, int], ...]) -> torch.Tensor:
    """The recipe's training text as one 1-D tensor of token ids (no special tokens added)."""
    text = training_text(data)
    ids: list[int] = []
    for i in range(0, len(text), 16_384):  # bounded pieces: the fast tokenizer's batch is cheaper than one call
        ids.extend(tokenizer(text[i:i + 16_384], add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def window_sampler(data: torch.Tensor, train: TrainRecipe, start_id: int) -> Callable[[], torch.Tensor]:
    """A function returning a batch of training windows `[start_id] + seq_len - 1 tokens`, from a seeded generator."""
    gen = torch.Generator().manual_seed(train.seed)
    span = train.seq_len - 1

    def batch() -> torch.Tensor:
        starts = torch.randint(0, len(data) - span, (train.batch_size,), generator=gen)
        rows = torch.stack([data[s:s + span] for s in starts.tolist()])
        return torch.cat([torch.full((train.batch_size, 1), start_id, dtype=torch.long), rows], dim=1)

    return batch


def lr_at(step: int, train: TrainRecipe) -> float:
    """Linear warm-up, then cosine decay to `lr * min_lr_ratio`."""
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    t = (step - train.warmup) / max(1, train.steps - train.warmup)
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _router_hooks(model) -> tuple[list, dict]:
    """Record the experts each DeepSeek router picks, for the bias update."""
    chosen: dict[torch.nn.Module, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, _inp, out: chosen.__setitem__(mod, out[2].detach()))
               for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    return handles, chosen


def train(model, tokenizer, train: TrainRecipe, *, desc: str, progress: bool = True) -> list[float]:
    """Next-token training with AdamW, warm-up and cosine decay; returns the loss of every step.

    DeepSeek routers are balanced as in DeepSeek-V3 (no auxiliary loss: after each step each
    expert's score-correction bias moves by `bias_update_rate` towards equal load); Qwen3-MoE
    adds its own load-balancing auxiliary loss (`router_aux_loss_coef`).
    """
    start_id = model.config.bos_token_id
    next_batch = window_sampler(token_stream(tokenizer, train.data), train, start_id)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=train.lr, betas=(0.9, 0.95))
    qwen_aux = model.config.model_type == "qwen3_moe"
    handles, chosen = _router_hooks(model)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(train.steps), desc=desc, disable=not progress, leave=True, mininterval=1.0,
               position=BAR_POSITION)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, train)
            batch = next_batch()
            out = model(input_ids=batch, labels=batch, output_router_logits=qwen_aux or None)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():  # b_i += rate * sign(mean load - load_i)
                for router, idx in chosen.items():
                    load = torch.bincount(idx.reshape(-1), minlength=router.e_score_correction_bias.numel()).float()
                    router.e_score_correction_bias += train.bias_update_rate * torch.sign(load.mean() - load)
            chosen.clear()
            lm_loss = float(out.loss.detach())
            if getattr(out, "aux_loss", None) is not None:  # report the language-model loss alone
                lm_loss -= model.config.router_aux_loss_coef * float(out.aux_loss.detach())
            losses.append(lm_loss)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for h in handles:
            h.remove()
        bar.close()
    model.eval()
    return losses

