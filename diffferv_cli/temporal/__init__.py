"""Temporal attention for a stock diffusers UNet: SWCFA + TTA on self-attention, controllable
cross-attention maps (paper 3.3 and 3.4). See `context.py` for the per-call contract."""

from diffferv_cli.temporal.context import AttentionContext, FeatureControl, FeatureKind
from diffferv_cli.temporal.install import attention_layers, temporal_attention
from diffferv_cli.temporal.processors import (
    CrossAttention,
    TemporalSelfAttention,
    sliding_window_attention,
    trajectory_attention,
    window_bounds,
)

__all__ = [
    "AttentionContext",
    "CrossAttention",
    "FeatureControl",
    "FeatureKind",
    "TemporalSelfAttention",
    "attention_layers",
    "sliding_window_attention",
    "temporal_attention",
    "trajectory_attention",
    "window_bounds",
]
