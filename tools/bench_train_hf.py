"""The Hugging Face transformers row of `trident bench train`.

The same architecture as `transformers.LlamaForCausalLM` (RoPE + RMSNorm + SwiGLU) or
`GPT2LMHeadModel` (learned positions + LayerNorm + GeLU), chosen and configured by the
mappings trident's HF export uses (`checkpoint.hf.hf_architecture`, `llama_config`,
`gpt2_config`), with SDPA attention and `torch.optim.AdamW` at the run's lr, betas, eps
and weight decay, stepped on the same global batch as the other rows: what a user who
picked transformers instead would run.
"""

from __future__ import annotations


def hf_step(cfg, device):
    """(step, None), or (None, why the transformers row is skipped)."""
    from trident.checkpoint.hf import hf_architecture
    from trident.errors import UserError

    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed (pip install 'trident[test]'), so its row is skipped"
    try:
        arch = hf_architecture(cfg.model)
    except UserError as err:
        return None, f"transformers row skipped: {str(err).removeprefix('cannot export to Hugging Face: ')}"
    return _HFStep(cfg, device, transformers, arch), None


def hf_model_name(arch: str) -> str:
    return {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]


class _HFStep:
    """One step of `LlamaForCausalLM`/`GPT2LMHeadModel` + AdamW on the bench's global batch."""

    def __init__(self, cfg, device, transformers, arch: str) -> None:
        import torch

        from trident.checkpoint.hf_gpt2 import gpt2_config
        from trident.checkpoint.hf_llama import llama_config
        from trident.tools.bench_train import synthetic_batch

        self.cfg, self.device, self.arch = cfg, device, arch
        self.name = f"transformers {hf_model_name(arch)}"
        m = cfg.model
        fields = (llama_config if arch == "llama" else gpt2_config)(m)
        fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type")}
        fields.update(tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, use_cache=False)
        config_cls = transformers.LlamaConfig if arch == "llama" else transformers.GPT2Config
        config = config_cls(**fields)
        config._attn_implementation = "sdpa"
        model_cls = getattr(transformers, hf_model_name(arch))
        torch.manual_seed(cfg.train.seed)
        self.model = model_cls(config).to(device=device, dtype=torch.float32).train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        n = cfg.train.global_batch_size // cfg.train.micro_batch_size
        self.micros = [{k: v.to(device) for k, v in mb.items()} for mb in synthetic_batch(cfg, n, cfg.train.seed)]
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.dtype)

    def __call__(self) -> float:
        import torch
        import torch.nn.functional as F

        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for mb in self.micros:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                logits = self.model(input_ids=mb["tokens"], use_cache=False).logits
                # the labels are already the next tokens (HF's own loss would shift them again)
                loss = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten()) / len(self.micros)
            loss.backward()
            total += loss.detach()
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        return float(total)
