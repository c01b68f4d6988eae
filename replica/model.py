"""A Llama-family decoder (Llama 2/3/3.x, Mistral-style, SmolLM2) with merged q/k/v and
gate/up projections; every projection adds each row's own LoRA delta through kernels/."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from replica.attention import AttentionMetadata, paged_attention

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_model_len: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        if cfg.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not a Llama-family model")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("attention_bias / mlp_bias are not supported")
        # transformers >= 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"rope type {rope_type!r} is not supported")
        heads = cfg["num_attention_heads"]
        max_len = cfg.get("max_position_embeddings", 4096)
        if cfg.get("sliding_window"):  # a window no shorter than the context is plain causal attention
            max_len = min(max_len, cfg["sliding_window"])
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_model_len=max_len,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


@dataclass
class LoRABatch:
    """The step's adapter view: the pool's stacked slot tensors plus each row's slot."""

    lora_a: dict[str, torch.Tensor]  # module -> [num_layers, num_slots, max_rank, in]
    lora_b: dict[str, torch.Tensor]  # module -> [num_layers, num_slots, out, max_rank]
    slot_ids: torch.Tensor  # int32 [T]
    scalings: torch.Tensor  # float32 [num_slots]
    ranks: torch.Tensor  # int32 [num_slots]
    meta: Any  # kernels.LoRAMeta, built once per step
    backend: str

    def linear(self, x: torch.Tensor, weight: torch.Tensor, layer: int, modules: tuple[str, ...],
               gemm_backend: str) -> torch.Tensor:
        """x @ weight.T (kernels.linear's, with gemm_backend) plus each row's adapter delta of these (merged)
        modules."""
        return kernels.linear_lora(x, weight, [self.lora_a[m][layer] for m in modules],
                                   [self.lora_b[m][layer] for m in modules], self.slot_ids, self.scalings,
                                   ranks=self.ranks, meta=self.meta, backend=self.backend, gemm_backend=gemm_backend)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RMSNorm(nn.Module):
    """Holds the weight; kernels.rms_norm adds the residual and normalizes in one pass."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); the sum is the next layer's residual."""
        return kernels.rms_norm(x, self.weight, self.eps, residual, backend=backend)


def _weight(out_features: int, in_features: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int) -> None:
        super().__init__()
        self.args = args
        self.index = index
        d = args.head_dim
        self.q_size, self.kv_size = args.num_heads * d, args.num_kv_heads * d
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.qkv_proj = _weight(self.q_size + 2 * self.kv_size, args.hidden_size)
        self.o_proj = _weight(args.hidden_size, self.q_size)
        self.gate_up_proj = _weight(2 * args.intermediate_size, args.hidden_size)
        self.down_proj = _weight(args.hidden_size, args.intermediate_size)

    def _linear(
        self, x: torch.Tensor, weight: torch.Tensor, lora: LoRABatch | None, modules: tuple[str, ...], backend: str
    ) -> torch.Tensor:
        if lora is None:
            return kernels.linear(x, weight, backend=backend)
        return lora.linear(x, weight, self.index, modules, backend)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        lora: LoRABatch | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the MLP's output and the residual stream it is still to be added to (the
        next norm adds it, fused)."""
        args, d = self.args, self.args.head_dim
        x, residual = self.input_layernorm(h, residual, backend)
        qkv = self._linear(x, self.qkv_proj, lora, QKV, backend)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, args.num_heads, d)
        k = k.view(-1, args.num_kv_heads, d)
        v = v.view(-1, args.num_kv_heads, d)
        kernels.rotary_(q, k, cos, sin, backend=backend)
        o = paged_attention(q, k, v, k_cache, v_cache, attn, scale=d**-0.5)
        o = self._linear(o.flatten(1), self.o_proj, lora, ("o_proj",), backend)
        x, residual = self.post_attention_layernorm(o, residual, backend)
        gate_up = self._linear(x, self.gate_up_proj, lora, GATE_UP, backend)
        return self._linear(kernels.silu_and_mul(gate_up, backend=backend), self.down_proj, lora, ("down_proj",),
                            backend), residual


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # The norm / rotary / silu kernels: "triton" (what "auto" picks on CUDA) or "torch".
        self.ops_backend = "auto"
        self.embed_tokens = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = (
            self.embed_tokens
            if args.tie_word_embeddings
            else nn.Parameter(torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: Any,
        attn: AttentionMetadata,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        """input_ids/positions [T]; returns the final hidden states [T, hidden]."""
        h = F.embedding(input_ids, self.embed_tokens)
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        residual = None
        for layer, k_cache, v_cache in zip(self.layers, kv_cache.k, kv_cache.v, strict=True):
            h, residual = layer(h, residual, cos, sin, k_cache, v_cache, attn, lora, self.ops_backend)
        return self.norm(h, residual, self.ops_backend)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
