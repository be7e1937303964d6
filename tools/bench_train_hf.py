"""The Hugging Face transformers row of `trident bench train`.

The same architecture as `transformers.LlamaForCausalLM` (RoPE + RMSNorm + SwiGLU) or
`GPT2LMHeadModel` (learned positions + LayerNorm + GeLU), chosen and configured by the
mappings trident's HF export uses (`checkpoint.hf.hf_architecture`, `llama_config`,
`gpt2_config`; a mixture of experts is `MixtralForCausalLM`, `mixtral_config`, which adds no
balancing loss: output_router_logits=False), with SDPA attention and `torch.optim.AdamW` at the
run's lr, betas, eps and weight decay, stepped on the same global batch as the other rows: what a user who
picked transformers instead would run.
"""

from __future__ import annotations

from trident.tools.bench_train import PlainStep


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
    return {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM"}[arch]


class _HFStep(PlainStep):
    """One step of `LlamaForCausalLM`/`GPT2LMHeadModel` + AdamW on the bench's global batch."""

    def __init__(self, cfg, device, transformers, arch: str) -> None:
        import torch

        from trident.checkpoint.hf_gpt2 import gpt2_config
        from trident.checkpoint.hf_llama import llama_config
        from trident.checkpoint.hf_mixtral import mixtral_config

        self.arch = arch
        self.name = f"transformers {hf_model_name(arch)}"
        m = cfg.model
        fields = {"llama": llama_config, "gpt2": gpt2_config, "mixtral": mixtral_config}[arch](m)
        fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type")}
        fields.update(tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, use_cache=False)
        config_name = {"llama": "LlamaConfig", "gpt2": "GPT2Config", "mixtral": "MixtralConfig"}[arch]
        config_cls = getattr(transformers, config_name)
        config = config_cls(**fields)
        config._attn_implementation = "sdpa"
        model_cls = getattr(transformers, hf_model_name(arch))
        torch.manual_seed(cfg.train.seed)
        super().__init__(cfg, device, model_cls(config).to(device=device, dtype=torch.float32).train())

    def loss(self, mb: dict):
        import torch.nn.functional as F

        logits = self.model(input_ids=mb["tokens"], use_cache=False).logits
        # the labels are already the next tokens (HF's own loss would shift them again)
        return F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten())
