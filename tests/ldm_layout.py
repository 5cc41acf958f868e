"""Test helper: write small diffusers Stable Diffusion 1.x models as single-file checkpoints in the
ORIGINAL (CompVis / LDM) key layout, the one ``from_single_file`` reads.

diffusers only converts LDM -> diffusers (``diffusers.loaders.single_file_utils``); this module is the
reverse, written against that converter so that ``convert_ldm_*`` gives back every tensor bit-identically.

    from ldm_layout import to_ldm_state_dict, write_single_file   # tests/ is on sys.path, like `media`

    sd = to_ldm_state_dict(unet, vae, text_encoder)       # {"model.diffusion_model....": tensor, ...}
    write_single_file(path, unet, vae, text_encoder, extra={"some.key": torch.zeros(1)})

Layout (prefixes):
  UNet2DConditionModel -> "model.diffusion_model."   (time_embed, input_blocks, middle_block, output_blocks, out)
  AutoencoderKL        -> "first_stage_model."       (encoder.down.i.block.j, mid.block_1/attn_1/block_2, ...)
  CLIPTextModel        -> "cond_stage_model.transformer.text_model." + the HF key names
Only SD 1.x-shaped models are handled (CrossAttn/plain down & up blocks, UNetMidBlock2DCrossAttn, an int
``layers_per_block``); any diffusers key that has no LDM name raises ``ValueError`` rather than being dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D (UNet) -> LDM ResBlock
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers top-level UNet layers -> LDM
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# diffusers VAE top-level layers -> LDM
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
# diffusers VAE mid-block attention (linear) -> LDM AttnBlock (1x1 conv)
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _unet_resnet(rest: str) -> str:
    """'norm1.weight' -> 'in_layers.0.weight' (rest is relative to one ResnetBlock2D)."""
    module, param = _split_param(rest)
    if module not in _UNET_RESNET:
        raise ValueError(f"unknown UNet resnet layer {rest!r}")
    return f"{_UNET_RESNET[module]}.{param}"


def _unet_key_map(unet) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (without the "model.diffusion_model." prefix)."""
    config = unet.config
    per_level = config.layers_per_block
    if not isinstance(per_level, int):
        raise ValueError(f"layers_per_block must be an int for the LDM layout, got {per_level!r}")
    if config.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
        raise ValueError(f"unsupported mid_block_type {config.mid_block_type!r}")
    up_has_attention = ["CrossAttn" in kind for kind in config.up_block_types]

    mapping: dict[str, str] = {}
    for key in unet.state_dict():
        module, param = _split_param(key)
        if module in _UNET_TOP:
            mapping[key] = f"{_UNET_TOP[module]}.{param}"
            continue
        match = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
        if match:
            level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            base = 1 + level * (per_level + 1)
            if kind == "resnets":
                mapping[key] = f"input_blocks.{base + index}.0.{_unet_resnet(rest)}"
            elif kind == "attentions":
                mapping[key] = f"input_blocks.{base + index}.1.{rest}"
            else:  # downsamplers.0.conv.{weight,bias}
                if not rest.startswith("conv."):
                    raise ValueError(f"unknown downsampler layer {key!r}")
                mapping[key] = f"input_blocks.{base + per_level}.0.op.{rest[len('conv.'):]}"
            continue
        match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if match:
            kind, index, rest = match[1], int(match[2]), match[3]
            if kind == "resnets":
                mapping[key] = f"middle_block.{2 * index}.{_unet_resnet(rest)}"
            else:
                mapping[key] = f"middle_block.{2 * index + 1}.{rest}"
            continue
        match = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
        if match:
            level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            base = level * (per_level + 1)
            if kind == "resnets":
                mapping[key] = f"output_blocks.{base + index}.0.{_unet_resnet(rest)}"
            elif kind == "attentions":
                mapping[key] = f"output_blocks.{base + index}.1.{rest}"
            else:  # the upsampler follows the last resnet (and its attention, if any)
                if not rest.startswith("conv."):
                    raise ValueError(f"unknown upsampler layer {key!r}")
                slot = 2 if up_has_attention[level] else 1
                mapping[key] = f"output_blocks.{base + per_level}.{slot}.conv.{rest[len('conv.'):]}"
            continue
        raise ValueError(f"no LDM name for UNet key {key!r}")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError("two UNet keys map to the same LDM key")
    return mapping


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_key_map(vae) -> dict[str, str]:
    """diffusers AutoencoderKL key -> LDM key (without the "first_stage_model." prefix)."""
    levels = len(vae.config.block_out_channels)
    mapping: dict[str, str] = {}
    for key in vae.state_dict():
        module, param = _split_param(key)
        if module in _VAE_TOP:
            mapping[key] = f"{_VAE_TOP[module]}.{param}"
            continue
        match = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key)
        if match:
            level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            if kind == "resnets":
                mapping[key] = f"encoder.down.{level}.block.{index}.{_vae_resnet(rest)}"
            else:
                mapping[key] = f"encoder.down.{level}.downsample.{rest}"
            continue
        match = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key)
        if match:
            level, kind, index, rest = levels - 1 - int(match[1]), match[2], int(match[3]), match[4]
            if kind == "resnets":
                mapping[key] = f"decoder.up.{level}.block.{index}.{_vae_resnet(rest)}"
            else:
                mapping[key] = f"decoder.up.{level}.upsample.{rest}"
            continue
        match = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
        if match:
            mapping[key] = f"{match[1]}.mid.block_{int(match[2]) + 1}.{_vae_resnet(match[3])}"
            continue
        match = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
        if match and match[2] in _VAE_ATTN:
            mapping[key] = f"{match[1]}.mid.attn_1.{_VAE_ATTN[match[2]]}.{match[3]}"
            continue
        raise ValueError(f"no LDM name for VAE key {key!r}")
    return mapping


def _clip_key(key: str) -> str:
    """HF CLIPTextModel key -> LDM key. transformers >= 5.6 flattened CLIPTextModel (no `text_model.`
    submodule); the SD1 original files always carry `...transformer.text_model.<name>`."""
    if not key.startswith("text_model."):
        key = "text_model." + key
    return CLIP_PREFIX + key


def _is_vae_attention_projection(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One SD 1.x single-file state dict (LDM key layout) from diffusers/transformers modules.
    Tensors are detached copies (editing them does not touch the models), in the models' dtypes."""
    out: dict[str, torch.Tensor] = {}
    unet_sd = unet.state_dict()
    for key, ldm in _unet_key_map(unet).items():
        out[UNET_PREFIX + ldm] = unet_sd[key].detach().clone()
    vae_sd = vae.state_dict()
    for key, ldm in _vae_key_map(vae).items():
        tensor = vae_sd[key].detach().clone()
        if _is_vae_attention_projection(ldm) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # linear [c, c] -> 1x1 conv [c, c, 1, 1]
        out[VAE_PREFIX + ldm] = tensor
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):  # a buffer in some transformers versions; not a weight
            continue
        out[_clip_key(key)] = tensor.detach().clone()
    return out


def write_single_file(path, unet, vae, text_encoder, extra: dict | None = None) -> Path:
    """Write an SD 1.x single-file .safetensors checkpoint (LDM layout). `extra` keys are added last and
    replace any tensor of the same name (e.g. a test adding a detection key or corrupting a weight)."""
    from safetensors.torch import save_file

    state = to_ldm_state_dict(unet, vae, text_encoder)
    if extra:
        state.update(extra)
    state = {key: tensor.detach().contiguous() for key, tensor in state.items()}
    path = Path(path)
    save_file(state, str(path))
    return path


SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def to_open_clip_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in open_clip's layout (SD 2.x / SDXL's second encoder):
    q, k, v stacked into `attn.in_proj_*`, the projection stored transposed as `text_projection`."""
    state = {key.removeprefix("text_model."): value.detach().clone()
             for key, value in text_encoder.state_dict().items() if not key.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers = sorted({int(key.split(".")[2]) for key in state if key.startswith("encoder.layers.")})
    for layer in layers:
        inner, outer = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{outer}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{inner}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")])
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                out[f"{outer}{theirs}.{kind}"] = state.pop(f"{inner}{ours}.{kind}")
    if state:
        raise ValueError(f"no open_clip name for {sorted(state)[:5]}")
    return out


def write_sdxl_single_file(path, unet, vae, text_encoder, text_encoder_2, extra: dict | None = None) -> Path:
    """An SDXL single-file checkpoint: the UNet (its add_embedding as label_emb) and VAE as for SD 1.x, the
    first text encoder under conditioner.embedders.0, the second in open_clip layout under embedders.1."""
    from safetensors.torch import save_file

    state = {key: value for key, value in to_ldm_state_dict(unet, vae, text_encoder).items()
             if not key.startswith(CLIP_PREFIX)}
    for key, tensor in text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            state[SDXL_CLIP_PREFIX + _clip_key(key).removeprefix(CLIP_PREFIX)] = tensor.detach().clone()
    state.update(to_open_clip_state_dict(text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    if extra:
        state.update(extra)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return Path(path)
