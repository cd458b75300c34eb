"""LoRA through peft, and the policy's weights as the rollout engines load them.

With ``learner.lora.rank`` > 0 the learner's model is a peft model: every targeted linear layer
keeps its frozen weight (``...q_proj.base_layer.weight``) beside two trained matrices
(``...q_proj.lora_A.default.weight``, ``...lora_B...``), and only those are in the optimizer.
The rollout engines know nothing of adapters: they get each adapted weight merged,
``W + (alpha / r) B A``, under its Hugging Face name (``model.layers.0.self_attn.q_proj.weight``).

:class:`PublishedWeights` is that mapping for any learner model, adapted or not: each published
(Hugging Face) name, the parameters it is computed from (gathered together under ZeRO-3), and
the tensor itself. The learner's CPU and GPU publication paths, its checkpoints and its exported
policy all go through it, so they always agree.
"""

from __future__ import annotations

from typing import Iterator

from rlsys.learner.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def apply_lora(model, cfg: LoraConfig):
    """``model`` wrapped by peft with adapters on ``cfg.target_modules`` (frozen elsewhere).
    Target modules that match nothing raise ValueError naming them."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.target_modules
    spec = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    try:
        return get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=spec, bias="none"
            ),
        )
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ValueError(
            f"learner.lora.target_modules={list(targets)} matches no module of {type(model).__name__} ({e}); "
            f"its linear layers are named {', '.join(names)}"
        ) from None


def check_lora_targets(model_path: str, cfg: LoraConfig) -> None:
    """Apply ``cfg`` to the model's architecture on the meta device (no weights are read): a
    target list that matches nothing fails here, before any actor starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    apply_lora(model, cfg)


def base_model(module):
    """The transformers model under a peft wrapper (the module itself when there is none)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


class PublishedWeights:
    """The published (Hugging Face) weights of a learner model and where each comes from."""

    def __init__(self, module):
        params = dict(module.named_parameters())
        self.params = params
        modules = dict(module.named_modules())
        self.sources: dict[str, tuple[str, ...]] = {}
        self._lora: dict[str, object] = {}  # published name -> the peft layer that adapts it
        for name in params:
            if ".lora_A." in name or ".lora_B." in name:
                continue
            hf = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
            if name.endswith(".base_layer.weight"):
                owner = name[: -len(".base_layer.weight")]
                a, b = f"{owner}.lora_A.{ADAPTER}.weight", f"{owner}.lora_B.{ADAPTER}.weight"
                self.sources[hf] = (name, a, b)
                self._lora[hf] = modules[owner]
            else:
                self.sources[hf] = (name,)

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    @property
    def adapted(self) -> int:
        """How many published weights are merged from adapters."""
        return len(self._lora)

    def shape(self, name: str) -> tuple:
        p = self.params[self.sources[name][0]]
        return tuple(getattr(p, "ds_shape", p.shape))

    def dtype(self, name: str):
        return self.params[self.sources[name][0]].dtype

    def source_params(self, names) -> list:
        """The parameters ``names`` are computed from (what a ZeRO-3 gather needs)."""
        return [self.params[s] for n in names for s in self.sources[n]]

    def tensor(self, name: str):
        """The published tensor (its sources gathered, under ZeRO-3): a merged adapter layer is
        ``W + scaling * B A`` in the base weight's dtype, anything else the parameter itself."""
        w = self.params[self.sources[name][0]]
        layer = self._lora.get(name)
        if layer is None:
            return w.detach()
        return (w.detach() + layer.get_delta_weight(ADAPTER).detach()).to(w.dtype)

    def adapter_params(self) -> Iterator[tuple[str, object]]:
        """(name, parameter) of every adapter matrix (the trained parameters)."""
        for name, p in self.params.items():
            if ".lora_A." in name or ".lora_B." in name:
                yield name, p
