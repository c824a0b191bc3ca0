"""Lightning plumbing shared by the training stages: strategy and precision from the config."""

from __future__ import annotations

from typing import Any

import torch

from cai.errors import CaiError

STRATEGIES = ("auto", "ddp", "deepspeed")


def build_strategy(name: str, zero_stage: int = 0, offload_optimizer: bool = False, offload_parameters: bool = False) -> Any:
    """What `strategy=` names, as Lightning's Trainer takes it ('auto', 'ddp' or a DeepSpeedStrategy)."""
    if name not in STRATEGIES:
        raise CaiError(f"strategy.name: unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    if name != "deepspeed":
        return name
    if zero_stage not in (1, 2, 3):
        raise CaiError(f"strategy.zero_stage: DeepSpeed ZeRO stage must be 1, 2 or 3, got {zero_stage}")
    if offload_parameters and zero_stage != 3:
        raise CaiError("strategy.offload_parameters: parameter offload needs ZeRO stage 3 (strategy=deepspeed_zero3_offload)")
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=zero_stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters)
    except (ImportError, ModuleNotFoundError) as err:
        raise CaiError(f"strategy=deepspeed_zero{zero_stage}: DeepSpeed is not importable ({err}); `pip install deepspeed`") from None


def resolve_precision(precision: str) -> str:
    """'auto' is bf16-mixed on GPUs that support it, else full float32 (bf16 is slow on CPUs)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
