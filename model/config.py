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
MOE_ROUTERS = ("softmax", "sigmoid")


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
    moe_experts: int = 0
    """Routed experts per MoE layer (E); 0 keeps every MLP dense."""
    moe_top_k: int = 2
    """Experts each token is sent to (k <= E)."""
    moe_ffn_hidden: int | None = None
    """Inner width of one expert (SwiGLU); defaults to ffn_hidden."""
    moe_shared_experts: int = 0
    """Always-on experts (DeepSeek), run as one tensor-parallel SwiGLU of width shared * moe_ffn_hidden."""
    moe_layer_freq: int = 1
    """Every k-th block is MoE (block i when i % k == 0, Megatron's rule); 1 = all."""
    moe_router: str = "softmax"
    """softmax (Mixtral: top-k of the softmax, renormalised) or sigmoid (DeepSeek-V3: top-k of sigmoids, normalised)."""
    moe_aux_loss_coef: float = 0.0
    """Weight of the Switch load-balancing loss (1.0 when balanced), added to the training loss."""
    moe_bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias += rate * sign(mean load - load) each step."""
    moe_z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE): mean of logsumexp(router logits)^2."""
    moe_capacity_factor: float | None = None
    """None = dropless; else each expert takes at most ceil(factor * tokens * k / E) tokens, the rest are dropped."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.hidden

    @property
    def moe_ffn(self) -> int:
        return self.moe_ffn_hidden if self.moe_ffn_hidden is not None else self.ffn

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_experts > 0 and layer % self.moe_layer_freq == 0

    def _validate_moe(self) -> None:
        e, k = self.moe_experts, self.moe_top_k
        if not isinstance(e, int) or e < 0:
            raise UserError(f"model.moe_experts must be a whole number >= 0 (0 = dense), got {e!r}")
        if e == 0:
            return
        if not isinstance(k, int) or not 1 <= k <= e:
            raise UserError(f"model.moe_top_k={k!r} must be a whole number in [1, model.moe_experts={e}]")
        for name in ("moe_layer_freq",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"model.{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.moe_shared_experts, int) or self.moe_shared_experts < 0:
            raise UserError(f"model.moe_shared_experts must be a whole number >= 0, got {self.moe_shared_experts!r}")
        if self.moe_ffn < 1:
            raise UserError(f"model.moe_ffn_hidden must be >= 1, got {self.moe_ffn}")
        if self.moe_router not in MOE_ROUTERS:
            raise UserError(f"model.moe_router is {self.moe_router!r}; valid values are {', '.join(MOE_ROUTERS)}")
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate", "moe_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise UserError(f"model.{name} must be >= 0, got {getattr(self, name)!r}")
        cap = self.moe_capacity_factor
        if cap is not None and not cap > 0:
            raise UserError(f"model.moe_capacity_factor must be > 0 or null (dropless), got {cap!r}")
        if self.activation != "swiglu" or self.bias:
            raise UserError(
                f"MoE experts are SwiGLU without biases; set model.activation=swiglu and model.bias=false "
                f"(got {self.activation!r}, bias={self.bias}) or model.moe_experts=0"
            )

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
        self._validate_moe()
        return self

    def check_tp(self, tp: int, ep: int = 1) -> "ModelConfig":
        """Raise one sentence if this model cannot be split over `tp` ranks (and its experts over `ep`)."""
        self.validate()
        if ep > 1 and (self.moe_experts == 0 or self.moe_experts % ep != 0):
            what = "has no experts (a dense model)" if self.moe_experts == 0 else f"has {self.moe_experts} experts"
            raise UserError(f"parallel.ep={ep} needs model.moe_experts divisible by ep, but the model {what}; "
                            f"choose an ep dividing model.moe_experts, or ep=1")
        if self.n_heads % tp != 0:
            raise UserError(f"model.n_heads={self.n_heads} is not divisible by tp={tp}; choose tp dividing {self.n_heads}")
        if self.ffn % tp != 0:
            raise UserError(f"model.ffn_hidden={self.ffn} is not divisible by tp={tp}")
        shared = self.moe_shared_experts * self.moe_ffn if self.moe_experts else 0
        if shared % tp != 0:
            raise UserError(f"model.moe_shared_experts x moe_ffn_hidden = {shared} is not divisible by tp={tp}")
        kv = self.kv_heads
        if kv % tp != 0 and tp % kv != 0:
            raise UserError(
                f"model.n_kv_heads={kv} is neither divisible by tp={tp} nor a divisor of it; "
                f"kv heads are split when tp divides them and replicated when they divide tp"
            )
        return self

    def num_parameters(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameters of the unpadded, unsharded model; `active`: those one token uses (k of
        the E routed experts per MoE layer, plus the router and shared experts)."""
        h, f, v, kv_dim = self.hidden, self.ffn, self.vocab_size, self.kv_heads * self.head_dim
        b = 1 if self.bias else 0
        attn = h * (h + 2 * kv_dim) + b * (h + 2 * kv_dim) + h * h + b * h
        mlp = (3 * h * f if self.activation == "swiglu" else 2 * h * f) + b * (f * (2 if self.activation == "swiglu" else 1) + h)
        norm = h * (2 if self.norm == "layernorm" and self.bias else 1)
        qk = 2 * self.head_dim if self.qk_norm else 0
        per_layer = attn + mlp + 2 * norm + qk
        total = self.n_layers * per_layer + norm
        n_moe = sum(self.is_moe_layer(i) for i in range(self.n_layers))
        if n_moe:
            experts = (self.moe_top_k if active else self.moe_experts) + self.moe_shared_experts
            total += n_moe * (self.moe_experts * h + experts * 3 * h * self.moe_ffn - mlp)
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
