"""LoRA adapters (the `peft` config group) for SFT, the PM and PPO, with the PEFT library.

`peft=none` (the default, and the paper) trains every weight. `peft=lora` freezes the model and
trains low-rank adapters on its linear layers (Hu et al., 2021): no gradients and no AdamW state for
the frozen weights, so training needs about a third of the memory of full fine-tuning, and PPO's
frozen reference is the same weights with the adapter turned off (no second copy of the policy).

`add_adapters` injects the adapters into the model in place and returns PEFT's wrapper: the stages
keep using the model itself (its forward runs the adapters), and use the wrapper to switch them
off, to save them and to merge them. A stage writes the merged model, which plain `transformers`
loads (`merged_state_dict`, computed without touching the trained weights), and the adapter,
which `peft` loads (`PeftModel.from_pretrained(base, "<stage dir>/adapter")`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from cai.errors import CaiError

log = logging.getLogger(__name__)
KINDS = ("none", "lora")


def check(cfg: DictConfig) -> None:
    """One line for a LoRA setting cai does not run, before any model loads."""
    if cfg.peft.kind not in KINDS:
        raise CaiError(f"peft.kind: choose {', '.join(KINDS)}, got '{cfg.peft.kind}'")
    if cfg.peft.kind == "lora" and getattr(cfg.strategy, "zero_stage", 0) == 3:
        raise CaiError(
            "peft=lora with strategy=deepspeed_zero3: not supported yet (the merged weights are computed on unsharded "
            "layers); LoRA's frozen weights are small enough for strategy=ddp or deepspeed_zero2"
        )


def add_adapters(model: torch.nn.Module, peft: DictConfig | None, task: str = "causal", seed: int = 0) -> Any:
    """Freeze `model` and inject LoRA adapters into its linear layers, in place; PEFT's wrapper, or None for peft=none.

    task: "causal" (SFT, PPO's actor), "seq_cls" (the PM: its scalar `score` head is trained in full)
    or "feature" (PPO's separate critic backbone). The adapters' random start comes from `seed`
    alone, on a forked generator: the same in a resumed or stand-alone stage as under stage=all,
    and the rest of the run draws the numbers it drew without LoRA.
    """
    if peft is None or peft.kind == "none":
        return None
    from peft import LoraConfig, TaskType, get_peft_model

    targets = peft.target_modules if isinstance(peft.target_modules, str) else list(peft.target_modules)
    task_type = {"causal": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS, "feature": TaskType.FEATURE_EXTRACTION}[task]
    config = LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=["score"] if task == "seq_cls" else None,
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []  # a model on the GPU draws from CUDA's generator
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        wrapper = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("peft=lora: training %d of %d parameters (%.2f%%), rank %d", trainable, total, 100 * trainable / total, peft.r)
    return wrapper


def merged_state_dict(wrapper: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with the adapters merged in, under the plain model's names, on the CPU.

    W + B A * alpha / r for every adapted layer (PEFT's `get_delta_weight`), the trained copy of a
    fully trained module (the PM's score head); the model itself is left as it is, adapters and all.
    """
    from peft.tuners.lora import LoraLayer

    base = wrapper.get_base_model()
    adapted = {  # each delta is computed when its weight is merged: all of them at once would be the linear layers' size again
        f"{name}.base_layer.weight": module
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight") and module.active_adapters
    }
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue
        value = value.detach()
        if key in adapted:
            module = adapted[key]
            value = value + module.get_delta_weight(module.active_adapters[0]).to(value.dtype)
        key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        value = value.cpu()
        state[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return state


def trained_state(model: torch.nn.Module, wrapper: Any, strategy: Any, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """What a training stage saves: the adapters merged in (peft=lora), or the full weights gathered
    across ZeRO-3 shards (a collective there: every rank calls it)."""
    if wrapper is not None:
        return merged_state_dict(wrapper, dtype)
    from cai.training import gathered_state_dict

    return gathered_state_dict(model, strategy, dtype)
