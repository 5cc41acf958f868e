"""Install the temporal attention processors on a stock UNet by module path, and restore the originals."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffferv_cli.temporal.processors import CrossAttention, TemporalSelfAttention

_PROCESSOR_SUFFIX = ".processor"


def attention_layers(unet) -> dict[str, str]:
    """Processor path -> "self" | "cross" for every `attn1` / `attn2` of the UNet's transformer blocks.

    Keys are the keys of `unet.attn_processors`, e.g.
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"; the layer name a processor is given
    is the same path without ".processor". Other attention modules (none in SD1.5) are left alone."""
    kinds = {"attn1": "self", "attn2": "cross"}
    layers = {}
    for path in unet.attn_processors:
        module_name = path.removesuffix(_PROCESSOR_SUFFIX).rsplit(".", 1)[-1]
        if module_name in kinds:
            layers[path] = kinds[module_name]
    return layers


@contextmanager
def temporal_attention(unet) -> Iterator[None]:
    """Install TemporalSelfAttention on every attn1 and CrossAttention on every attn2 by module path
    (unet.set_attn_processor({name: processor}) with the full processor dict), restore the originals in finally.

    Inside the block, pass the per-call facts as `unet(..., cross_attention_kwargs={"ctx": ctx})`."""
    originals = dict(unet.attn_processors)
    installed = dict(originals)
    for path, kind in attention_layers(unet).items():
        layer = path.removesuffix(_PROCESSOR_SUFFIX)
        installed[path] = TemporalSelfAttention(layer) if kind == "self" else CrossAttention(layer)
    unet.set_attn_processor(installed)  # set_attn_processor pops from the dict it is given: pass copies
    try:
        yield
    finally:
        unet.set_attn_processor(dict(originals))
