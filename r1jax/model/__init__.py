"""The DeepSeek-V3 family and its dense students in Flax NNX."""

from r1jax.model.decoder import Block, Decoder, ModelOutput
from r1jax.model.moe import RoutingBias, route, routing_bias_update
from r1jax.model.summary import ParamCount, count_params, kv_cache_bytes_per_token

__all__ = [
    "Block",
    "Decoder",
    "ModelOutput",
    "ParamCount",
    "RoutingBias",
    "count_params",
    "kv_cache_bytes_per_token",
    "route",
    "routing_bias_update",
]
