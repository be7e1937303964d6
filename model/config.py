"""The model's one config dataclass, its checks, and the named presets.

Every field documents itself (the string under it), so the training config and the CLI
help can show the same words. `validate` checks the config alone; `check_tp` checks it
against a tensor-parallel size and runs before any process group exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trident.errors import UserError
from trident.parallel.tensor.lean_linear import ACTIVATIONS as LEAN_ACTIVATIONS

POSITIONS = ("learned", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = tuple(LEAN_ACTIVATIONS)  # the MLP runs them through `activation_linear`


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Real vocabulary size (the tokenizer's); the embedding is padded past it for tp."""
    n_layers: int = 2
    """Number of transformer blocks."""
    hidden: int = 64
    """Width of the residual stream."""
    n_heads: int = 4
    """Query heads; hidden must divide by it."""
    n_kv_heads: int | None = None
    """Key/value heads: n_heads for multi-head, fewer for grouped-query, 1 for multi-query."""
    ffn_hidden: int | None = None
    """Inner width of the MLP; defaults to 4 * hidden."""
    max_seq_len: int = 256
    """Longest sequence the position tables (learned, RoPE) cover."""
    position: str = "rope"
    """learned | rope | alibi | none."""
    rope_theta: float = 10000.0
    """RoPE base (500000 for Llama 3)."""
    norm: str = "rmsnorm"
    """layernorm | rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon inside the norms."""
    norm_position: str = "pre"
    """pre (GPT-2, Llama) or post (the original transformer) normalisation."""
    qk_norm: bool = False
    """Normalise queries and keys per head before attention (OLMo 2, Qwen 3)."""
    activation: str = "swiglu"
    """swiglu (gate * up, Llama) or gelu (tanh approximation, GPT-2)."""
    bias: bool = False
    """Biases in the linear layers and LayerNorms."""
    dropout: float = 0.0
    """Dropout on the embedding output and on each residual branch."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    vocab_pad_multiple: int = 128
    """The embedding is padded to a multiple of this times tp (Megatron's rule)."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * n_layers)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.hidden

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "n_layers", "hidden", "n_heads", "max_seq_len", "vocab_pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name} must be a whole number >= 1, got {value!r}")
        if self.ffn < 1:
            raise UserError(f"model.ffn_hidden must be >= 1, got {self.ffn}")
        for name, value, valid in (
            ("position", self.position, POSITIONS),
            ("norm", self.norm, NORMS),
            ("norm_position", self.norm_position, NORM_POSITIONS),
            ("activation", self.activation, ACTIVATIONS),
        ):
            if value not in valid:
                raise UserError(f"model.{name} is {value!r}; valid values are {', '.join(valid)}")
        if self.hidden % self.n_heads != 0:
            raise UserError(f"model.hidden={self.hidden} is not divisible by model.n_heads={self.n_heads}")
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise UserError(f"RoPE needs an even head size, got hidden/n_heads = {self.head_dim}")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv != 0:
            raise UserError(f"model.n_kv_heads={kv} must be >= 1 and divide model.n_heads={self.n_heads}")
        for name in ("dropout", "attention_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise UserError(f"model.{name}={p} must be in [0, 1)")
        return self

    def check_tp(self, tp: int) -> "ModelConfig":
        """Raise one sentence if this model cannot be split over `tp` ranks."""
        self.validate()
        if self.n_heads % tp != 0:
            raise UserError(f"model.n_heads={self.n_heads} is not divisible by tp={tp}; choose tp dividing {self.n_heads}")
        if self.ffn % tp != 0:
            raise UserError(f"model.ffn_hidden={self.ffn} is not divisible by tp={tp}")
        kv = self.kv_heads
        if kv % tp != 0 and tp % kv != 0:
            raise UserError(
                f"model.n_kv_heads={kv} is neither divisible by tp={tp} nor a divisor of it; "
                f"kv heads are split when tp divides them and replicated when they divide tp"
            )
        return self

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameters of the unpadded, unsharded model."""
        h, f, v, kv_dim = self.hidden, self.ffn, self.vocab_size, self.kv_heads * self.head_dim
        b = 1 if self.bias else 0
        attn = h * (h + 2 * kv_dim) + b * (h + 2 * kv_dim) + h * h + b * h
        mlp = (3 * h * f if self.activation == "swiglu" else 2 * h * f) + b * (f * (2 if self.activation == "swiglu" else 1) + h)
        norm = h * (2 if self.norm == "layernorm" and self.bias else 1)
        qk = 2 * self.head_dim if self.qk_norm else 0
        per_layer = attn + mlp + 2 * norm + qk
        total = self.n_layers * per_layer + norm
        if include_embedding:
            total += v * h * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                total += self.max_seq_len * h
        return total

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # a model small enough for multi-process tests; heads, kv heads and ffn divide by 1, 2, 4
    "tiny": ModelConfig(
        vocab_size=101, n_layers=2, hidden=64, n_heads=8, n_kv_heads=4, ffn_hidden=128, max_seq_len=64
    ),
    # GPT-2 small (Radford et al. 2019)
    "gpt2-124m": ModelConfig(
        vocab_size=50257, n_layers=12, hidden=768, n_heads=12, ffn_hidden=3072, max_seq_len=1024,
        position="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True,
        dropout=0.1, attention_dropout=0.1,
    ),
    # Llama 3.2 1B shapes
    "llama-1b": ModelConfig(
        vocab_size=128256, n_layers=16, hidden=2048, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
        max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True,
    ),
    # Llama 3 8B shapes
    "llama-8b": ModelConfig(
        vocab_size=128256, n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
        max_seq_len=8192, rope_theta=500000.0,
    ),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; valid presets are {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()
