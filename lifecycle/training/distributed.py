"""Distribution strategies that need more than a name in YAML."""
from __future__ import annotations

import functools


def _is_block(module) -> bool:
    # One FSDP unit per transformer block, whatever the architecture calls it.
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name in ("GPT2Block", "Block")


def fsdp(sharding_strategy: str, activation_checkpointing: bool):
    """Lightning's FSDPStrategy wrapping each transformer block."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_block)
    return FSDPStrategy(sharding_strategy=sharding_strategy, auto_wrap_policy=policy,
                        activation_checkpointing_policy=policy if activation_checkpointing else None,
                        state_dict_type="full")
