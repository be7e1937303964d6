"""Megatron-LM's own activation formula, the anchor `trident plan` and `trident bench memory`
are compared with.

Megatron-LM's ``megatron/training/theoretical_memory_usage.py`` (``compute_activation_memory``)
prices the first pipeline stage's activations, in bytes, assuming bf16, sequence
parallelism and selective recomputation (Korthikanti et al. 2022, Table 2, with a SwiGLU
correction)::

    per layer   = s·b·h · (18 + 4·f/h)                       (attention 11, norms 4, MLP 2 + 4f/h, masks 1)
    layers      = per layer · L                              (stage 0 holds pp microbatches of L/pp layers)
    + 8·s·b·pp  + s·b·h·pp                                   (embedding input ids and dropout mask)
    · (1 + (pp - 1)/(pp·v))        with v virtual stages     (interleaved: its in-flight penalty)
    · min(1, m/pp)                 otherwise                 (1F1B with fewer microbatches than stages)
    + s·b·h · 4 · (1 + V/h)          only when pp = 1        (final norm, head input, fp32 logits)
    all / tp

with V the padded vocabulary. `megatron_activation_bytes` evaluates exactly that for a
trident layout; the interleaved penalty applies to ``pp_schedule: interleaved`` (rank 0
holds (pp-1)·2 + (v-1)·pp + 1 chunk-microbatches of L/(pp·v) layers: L·(1 + (pp-1)/(pp·v))
layers' worth). Megatron has no ZB-H1 term; its 1F1B figure is what ZB-H1 keeps in saved
tensors. trident's own count, tensor by tensor and along the schedule's step list, is
`trident.planning.plan_memory` and `trident.planning.plan_pipeline`.
"""

from __future__ import annotations

from trident.model.config import ModelConfig
from trident.parallel.tensor.layers import padded_vocab_size
from trident.planning.plan import Settings


def megatron_layer_bytes(cfg: ModelConfig, seq: int, micro_batch: int, tp: int) -> float:
    """Megatron's bytes per transformer layer per microbatch on one tp rank."""
    return seq * micro_batch * cfg.hidden * (18 + 4 * cfg.ffn / cfg.hidden) / tp


def megatron_activation_bytes(cfg: ModelConfig, st: Settings) -> float:
    """Megatron's activation bytes of the first pipeline stage for `st`'s layout and batch."""
    s, b, h, pp = st.seq_len, st.micro_batch_size, cfg.hidden, st.pp
    total = s * b * h * (18 + 4 * cfg.ffn / h) * cfg.n_layers
    total += 8 * s * b * pp + s * b * h * pp
    if st.schedule == "interleaved":
        total *= 1 + (pp - 1) / (pp * st.vpp)
    elif pp > 1:
        total *= min(1.0, st.microbatches / pp)
    else:
        vocab = padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple, st.tp)
        total += s * b * h * 4 * (1 + vocab / h)
    return total / st.tp
