"""Single-process checks of the optimizer side: config errors, the loss scaler's schedule,
parameter groups, the global-index bookkeeping of optimizer shards, misuse of the
gradient buffer, and the step protocol at dp = 1 against torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

from trident.errors import UserError
from trident.model.config import preset
from trident.model.gpt import GPT
from trident.parallel.tensor.sharding import Piece
from trident.parallel.topology import Topology
from trident.parallel.zero.grad_buffer import GradBuffer
from trident.parallel.zero.mixed_precision import LossScaler, MixedPrecisionConfig, parse_dtype
from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig, split_decay
from trident.parallel.zero.state_layout import global_indices, piece_elements


def _tiny(**kw) -> GPT:
    model = GPT(preset("tiny", **kw), Topology.single())
    model.init_weights(0)
    return model


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: OptimizerConfig(zero=4).validate(), ["optim.zero", "4", "0, 1, 2, 3"]),
        (lambda: OptimizerConfig(lr=-1.0).validate(), ["optim.lr", "-1.0"]),
        (lambda: OptimizerConfig(beta2=1.0).validate(), ["optim.beta2", "[0, 1)"]),
        (lambda: DistributedOptimizer(_tiny(), Topology.single(), on_nonfinite="ignore"), ["'ignore'", "skip", "error"]),
        (lambda: parse_dtype("fp8"), ["'fp8'", "fp32", "bf16", "fp16"]),
        (lambda: MixedPrecisionConfig(backoff_factor=1.5).validate(), ["backoff_factor", "(0, 1)"]),
        (lambda: GradBuffer(_tiny(), Topology.single(), bucket_size=0), ["bucket size", "0"]),
        (lambda: DistributedOptimizer(_tiny(), Topology.single(), precision=MixedPrecisionConfig("bf16")),
         ["fp32", "'bf16'", "dtype="]),
    ],
)
def test_user_errors_name_the_value_and_what_is_valid(make, words):
    with pytest.raises(UserError) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_loss_scaler_schedule_and_state():
    s = LossScaler(dynamic=True, initial_scale=8.0, growth_factor=2.0, growth_interval=2, backoff_factor=0.5, min_scale=2.0)
    s.update(found_inf=False)
    assert s.scale == 8.0
    s.update(found_inf=False)
    assert s.scale == 16.0  # grew after growth_interval clean steps
    s.update(found_inf=True)
    assert s.scale == 8.0 and s.clean_steps == 0 and s.skipped_steps == 1
    for _ in range(5):
        s.update(found_inf=True)
    assert s.scale == 2.0  # never below min_scale
    restored = LossScaler(dynamic=True, initial_scale=8.0, growth_interval=2)
    restored.load_state_dict(s.state_dict())
    assert (restored.scale, restored.clean_steps, restored.skipped_steps) == (2.0, 0, 6)
    static = LossScaler.from_config(MixedPrecisionConfig("bf16"))
    static.update(found_inf=True)
    loss = torch.tensor(3.0)
    assert static.scale == 1.0 and static.scale_loss(loss) is loss


def test_no_weight_decay_on_biases_norms_and_optionally_embeddings():
    model = _tiny(position="learned", norm="layernorm", activation="gelu", bias=True, n_kv_heads=None)
    decay, no_decay = split_decay(model, decay_embeddings=False)
    assert "embedding.weight" in no_decay and "pos_embedding" in no_decay
    assert "head.weight" in decay and "layers.0.attn.qkv.weight" in decay and "layers.1.mlp.proj.weight" in decay
    assert "layers.0.attn.qkv.bias" in no_decay and "layers.0.norm1.weight" in no_decay
    assert "layers.0.norm1.bias" in no_decay and "final_norm.weight" in no_decay
    assert all(dict(model.named_parameters())[n].dim() >= 2 for n in decay)
    decay2, _ = split_decay(model, decay_embeddings=True)
    assert "embedding.weight" in decay2 and "pos_embedding" in decay2


@pytest.mark.parametrize("dim, start, local_start", [(0, 3, 2), (1, 4, 0)])
def test_shard_entries_name_their_global_elements(dim, start, local_start):
    full = torch.arange(10 * 12, dtype=torch.float32).reshape(10, 12)  # the global tensor
    length = 5 if dim == 0 else 6
    local = torch.zeros(8, 12) if dim == 0 else torch.zeros(10, 6)
    local.narrow(dim, local_start, length).copy_(full.narrow(dim, start, length))
    piece = Piece("w", (10, 12), dim, start, length, local_start)
    a, z = 13, 57  # an owned flat range that starts and ends mid-row
    pos, gidx = piece_elements(tuple(local.shape), piece, a, z)
    assert torch.equal(local.reshape(-1)[a:z][pos], full.reshape(-1)[gidx])
    entry = {"global_name": "w", "global_shape": [10, 12], "local_shape": list(local.shape), "local_range": [a, z],
             "piece": {"dim": dim, "start": start, "length": length, "local_start": local_start, "replicas": 1}}
    assert torch.equal(global_indices(entry), gidx)


def test_gradients_after_the_reduction_was_launched_are_refused():
    model = _tiny()
    opt = DistributedOptimizer(model, Topology.single(), OptimizerConfig(zero=1, bucket_mb=0.02))
    tokens = torch.randint(0, 101, (2, 9))
    opt.zero_grad()
    model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
    with pytest.raises(RuntimeError, match="before_backward"):
        model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()


def test_microbatch_accumulation_and_state_round_trip_at_dp1():
    """Two microbatches through the protocol equal one full batch through torch AdamW, and
    a state dict loaded into a fresh optimizer continues identically."""
    cfg = dict(lr=1e-3, weight_decay=0.1, eps=1e-6, clip_grad=0.0, zero=2, bucket_mb=0.02)
    ref, model = _tiny(), _tiny()
    named = dict(ref.named_parameters())
    decay, no_decay = split_decay(ref, True)
    ref_opt = torch.optim.AdamW(
        [{"params": [named[n] for n in decay], "weight_decay": 0.1}, {"params": [named[n] for n in no_decay], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-6,
    )
    opt = DistributedOptimizer(model, Topology.single(), OptimizerConfig(**cfg))
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        tokens = torch.randint(0, 101, (4, 9), generator=gen)
        ref_opt.zero_grad()
        ref(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        ref_opt.step()
        opt.zero_grad()
        for mb in range(2):
            opt.before_backward(mb, is_last=mb == 1)
            part = tokens[2 * mb : 2 * mb + 2]
            (model(part[:, :-1], labels=part[:, 1:]).sum() / part.new_tensor(4 * 8)).backward()
        assert opt.step().stepped
    for name, p in model.named_parameters():
        assert (p - named[name]).norm() <= 1e-5 * named[name].norm(), name
    fresh = _tiny()
    fresh.init_weights(5)
    opt2 = DistributedOptimizer(fresh, Topology.single(), OptimizerConfig(**cfg))
    opt2.load_state_dict(opt.state_dict())
    assert opt2.step_count == 2
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    for a, b in zip(opt.exp_avg_sq + opt.exp_avg, opt2.exp_avg_sq + opt2.exp_avg):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deferred_gradients_accumulate_in_fp32(dtype):
    """A tp-partial or pipeline-tied parameter's gradient accumulates over microbatches in
    fp32 like any other: 1 + 2^-10 survives in bf16 (whose step at 1 is 2^-7), and 6e4 +
    6e4 does not overflow fp16 (max 65504) before the reduction."""
    from trident.parallel.pipeline.executor import finalize_grads
    from trident.parallel.tensor.sharding import mark_pipeline_tied, reduction_grad
    from trident.parallel.zero.grad_buffer import GradBuffer

    topo = Topology.single()
    plain = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    tied = mark_pipeline_tied(torch.nn.Parameter(torch.zeros(4, dtype=dtype)), duplicate=False)
    model = torch.nn.ParameterList([plain, tied])
    buf = GradBuffer(model, topo, zero=1)
    buf.zero_grad()
    scales = [1.0, 2.0**-10] if dtype == torch.bfloat16 else [6e4, 6e4]
    for mb, scale in enumerate(scales):
        buf.before_backward(mb, is_last=mb == len(scales) - 1)
        ones = torch.ones(4, dtype=dtype)
        ((plain * ones).sum() * scale + (tied * ones).sum() * scale).backward()
    assert reduction_grad(tied).dtype == torch.float32 and tied.grad is None
    finalize_grads(model, topo)
    buf.finish_grad_sync()
    grads = {}
    for b in buf.buckets:
        for slot in b.slots:
            grads[id(slot.param)] = b.main_grad[slot.start : slot.start + slot.numel]
    want = torch.full((4,), sum(scales), dtype=torch.float32)
    assert torch.equal(grads[id(plain)], want) and torch.equal(grads[id(tied)], want)
    assert not hasattr(tied, "main_grad")  # released with the buffer's step
