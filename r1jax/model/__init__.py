"""The DeepSeek-V3 family and its dense students in Flax NNX."""

from r1jax.model.decoder import Block, Decoder, ModelOutput
from r1jax.model.moe import RoutingBias, route, routing_bias_update

_SUMMARY = ("ParamCount", "count_params", "kv_cache_bytes_per_token", "matmul_params_per_token", "train_flops_per_token")


def __getattr__(name):  # lazy, so `python -m r1jax.model.summary` does not import itself twice
    if name in _SUMMARY:
        from r1jax.model import summary

        return getattr(summary, name)
    raise AttributeError(name)


__all__ = ["Block", "Decoder", "ModelOutput", "RoutingBias", "route", "routing_bias_update", *_SUMMARY]
