"""No host-device synchronisation inside the forward/backward of a step (CUDA only).

Under ``torch.cuda.set_sync_debug_mode("error")`` any ``.item()``, ``.cpu()``,
``bool(tensor)`` or ``int(tensor)`` on a CUDA tensor raises, so this catches a sync
that creeps into the model, the pipeline executor or the gradient buffers. The optimizer
step is outside the checked region on purpose: it reads the global gradient norm once per
step to decide between clipping, stepping and skipping (as Megatron does). Skipped where
no CUDA device is present (CI, the development machine).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("doc_masking", [False, True])
def test_forward_backward_and_grad_sync_never_wait_for_the_device(doc_masking):
    from trident.model.config import preset
    from trident.model.stage import build_stage
    from trident.parallel.pipeline.executor import run_pipeline
    from trident.parallel.pipeline.p2p import activation_shape
    from trident.parallel.topology import Topology
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    topo = Topology.single("cuda")
    cfg = preset("tiny")
    model = build_stage(cfg, topo, device="cuda")
    model.init_weights(0)
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=1))
    b, s = 2, 64
    g = torch.Generator().manual_seed(0)
    micros = []
    for _ in range(2):
        tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        mb = {"tokens": tokens[:, :-1].pin_memory(), "labels": tokens[:, 1:].pin_memory()}
        if doc_masking:
            mb["doc_ids"] = (torch.arange(s) // 24).expand(b, s).contiguous().pin_memory()
        micros.append(mb)
    for _ in range(2):  # the second step runs with every lazy allocation already made
        opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = run_pipeline(model, topo, micros, act_shape=activation_shape(b, s, cfg.hidden),
                                  loss_divisor=float(2 * b * s), grad_sync=opt.grad_sync,
                                  before_backward=opt.before_backward)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        step = opt.step()
        assert step.stepped and torch.isfinite(result.loss_tensor).all()
