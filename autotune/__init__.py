"""Config spaces, pruning and default picks for every kernel."""
from .configs import (  # noqa: F401
    Config,
    all_spaces,
    default_lora_grad,
    default_lora_matmul,
    default_lora_shrink,
    rank_block,
)
