"""The transformer language model and its FLOP count."""

from distlm.model.flops import flops_per_token, matmul_params
from distlm.model.transformer import (
    Transformer,
    apply_rotary,
    mlp_hidden_size,
    parameter_groups,
    rope_tables,
    sinusoidal_table,
)

__all__ = [
    "Transformer",
    "apply_rotary",
    "flops_per_token",
    "matmul_params",
    "mlp_hidden_size",
    "parameter_groups",
    "rope_tables",
    "sinusoidal_table",
]
