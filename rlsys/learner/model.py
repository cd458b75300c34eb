"""The learner's model as a rank builds it: attention, gradient checkpointing, LoRA, and a check
that packed sequences stay apart.

Order matters: restart weights (Hugging Face names) load into the plain model; gradient
checkpointing is the model's own (non-reentrant, so frozen embeddings under LoRA need no input
gradients); peft wraps last, so its frozen base layers keep everything before.
"""

from __future__ import annotations

import logging
from typing import Optional

from rlsys.learner.config import LearnerConfig

log = logging.getLogger(__name__)


def attention(cfg: LearnerConfig, on_gpu: bool) -> str:
    """The attention implementation to load: ``auto`` is flash_attention_2 on a GPU with
    flash-attn installed (variable-length kernels: packing costs no mask), else sdpa."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if on_gpu:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def load_policy(cfg: LearnerConfig, model_path: str, on_gpu: bool, initial_weights: Optional[list] = None):
    """The model a learner rank trains, on the CPU in fp32 (DeepSpeed moves and casts it)."""
    import torch
    from transformers import AutoModelForCausalLM

    attn = attention(cfg, on_gpu)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn)
    if initial_weights is not None:  # restart after a failure: the last committed (merged) policy
        if isinstance(initial_weights, str):  # published through shared memory
            from safetensors.torch import load_file

            initial_weights = list(load_file(initial_weights).items())
        model.load_state_dict(dict(initial_weights), strict=True)
    if cfg.packing and not attn.startswith("flash"):  # flash kernels take the boundaries from position ids
        check_packing(model)
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ValueError(f"{type(model).__name__} does not support learner.gradient_checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from rlsys.learner.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model


def check_packing(model, atol: float = 1e-4) -> None:
    """Two sequences packed into one row (position ids restarting) must give the second the
    logits it gets alone: a model whose attention ignores packed boundaries (a custom
    architecture that builds its own mask) is refused rather than trained on mixed sequences."""
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 5), generator=g), torch.randint(0, vocab, (1, 4), generator=g)
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits[:, 5:]
    model.train(was_training)
    err = float((alone - packed).abs().max())
    if not err <= atol:
        raise ValueError(
            f"learner.packing: {type(model).__name__} with attn_implementation="
            f"{model.config._attn_implementation} lets packed sequences attend to each other (logits differ by "
            f"{err:.3g}); turn packing off for this model"
        )
