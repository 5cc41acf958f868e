"""Config skeletons of the Stable Diffusion families, so that a single checkpoint file loads offline.

diffusers turns an original-layout checkpoint into its modules given a diffusers-layout folder of configs
(and tokenizer files); without one it fetches the family's repository from the hub. `skeleton_folder`
writes such a folder from what the package ships: the family's configs (SD 1.x, SD 2.x, SDXL), with every size
the checkpoint's tensors reveal (channels, layers, attention placement and depth, text width, vocabulary)
read from the file itself -- so a fine-tune of another size loads too -- and CLIP's tokenizer built from
OpenAI's byte-pair merges (`data/bpe_simple_vocab_16e6.txt.gz`, MIT licence, see data/LICENSE-CLIP).

What shapes cannot tell comes from the family: attention heads (SD 1.x: 8 per layer; SD 2.x: 64 channels
per head), 32 normalisation groups, the activation of the text encoder, the VAE's scaling factor.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

from diffferv_cli.models.families import SD15_SCHEDULER

DATA = Path(__file__).parent / "data"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."
XL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
XL_OPEN_CLIP = "conditioner.embedders.1.model."

PIPELINE_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.31.0",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}

def pipeline_index(sdxl: bool = False) -> dict:
    """model_index.json of an SD 1.x/2.x folder (no safety checker), or of an SDXL one."""
    if not sdxl:
        return dict(PIPELINE_INDEX)
    index = {key: value for key, value in PIPELINE_INDEX.items()
             if key not in ("safety_checker", "feature_extractor", "requires_safety_checker")}
    index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"])
    return index


FAMILIES = {
    "v1": dict(
        unet=dict(attention_head_dim=8, cross_attention_dim=768, sample_size=64),
        text=dict(hidden_act="quick_gelu", projection_dim=768),
        pad_token="<|endoftext|>",
        scheduler=dict(SD15_SCHEDULER),
    ),
    "v2": dict(
        unet=dict(attention_head_dim=None, cross_attention_dim=1024, sample_size=64, use_linear_projection=True),
        text=dict(hidden_act="gelu", projection_dim=512),
        pad_token="!",
        scheduler=dict(SD15_SCHEDULER),
    ),
    "xl_base": dict(  # SDXL base: CLIP ViT-L and OpenCLIP ViT-bigG side by side, size/crop conditioning
        unet=dict(attention_head_dim=None, cross_attention_dim=2048, sample_size=128, use_linear_projection=True),
        text=dict(hidden_act="quick_gelu", projection_dim=768),
        text_2=dict(hidden_act="gelu"),
        pad_token="<|endoftext|>",
        pad_token_2="!",
        scheduler=dict(SD15_SCHEDULER, timestep_spacing="leading"),
        vae=dict(scaling_factor=0.13025, force_upcast=True, sample_size=1024),
    ),
}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's tokenizer, built as OpenAI's `SimpleTokenizer` builds them: the 256 byte
    characters, the same with the word-end mark, one token per merge (the first 48,894), the two
    special tokens -- 49,408 in all."""
    lines = gzip.decompress((DATA / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _blocks(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` over `keys`."""
    regex = re.compile(pattern)
    return sorted({int(match.group(1)) for key in keys if (match := regex.match(key))})


def unet_config(shapes: Mapping[str, tuple], family: str, pooled_width: int | None = None) -> dict:
    """The UNet's config: the family's, with its levels, channels, attention and widths read from the
    original-layout tensors (`input_blocks`: conv_in, then per level its res(+attention) blocks and a
    downsampler but after the last level)."""
    keys = list(shapes)
    levels: list[dict] = [{"channels": None, "attention": False, "layers": 0, "depth": 1}]
    for index in _blocks(keys, re.escape(UNET) + r"input_blocks\.(\d+)\.")[1:]:
        block = f"{UNET}input_blocks.{index}."
        if f"{block}0.op.weight" in shapes:  # a downsampler closes the level
            levels.append({"channels": None, "attention": False, "layers": 0, "depth": 1})
            continue
        level = levels[-1]
        level["channels"] = shapes[f"{block}0.out_layers.3.weight"][0]
        level["layers"] += 1
        if f"{block}1.proj_in.weight" in shapes:
            level["attention"] = True
            level["depth"] = len(_blocks(keys, re.escape(block) + r"1\.transformer_blocks\.(\d+)\."))
    channels = [level["channels"] for level in levels]
    attention_key = next(key for key in keys if key.startswith(UNET) and key.endswith("attn2.to_k.weight"))
    proj_in = next(key for key in keys if key.startswith(UNET) and key.endswith("proj_in.weight"))
    config = dict(FAMILIES[family]["unet"])
    if config["attention_head_dim"] is None:  # SD 2.x: 64 channels per head
        config["attention_head_dim"] = [max(1, width // 64) for width in channels]
    depths = [level["depth"] for level in levels]
    config.update(
        in_channels=shapes[f"{UNET}input_blocks.0.0.weight"][1],
        out_channels=shapes[f"{UNET}out.2.weight"][0],
        block_out_channels=channels,
        layers_per_block=levels[0]["layers"],
        down_block_types=["CrossAttnDownBlock2D" if level["attention"] else "DownBlock2D" for level in levels],
        up_block_types=["CrossAttnUpBlock2D" if level["attention"] else "UpBlock2D" for level in reversed(levels)],
        cross_attention_dim=shapes[attention_key][1],
        use_linear_projection=len(shapes[proj_in]) == 2,
        transformer_layers_per_block=depths if len(set(depths)) > 1 else depths[0],
    )
    added = shapes.get(f"{UNET}label_emb.0.0.weight")
    if added is not None and pooled_width:  # SDXL: pooled text + 6 size/crop ids, each through a sinusoid
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=added[1],
                      addition_time_embed_dim=(added[1] - pooled_width) // 6)
    return config


def vae_config(shapes: Mapping[str, tuple], family: str = "v1") -> dict:
    keys = list(shapes)
    levels = _blocks(keys, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    channels = [shapes[f"{VAE}encoder.down.{level}.block.0.conv1.weight"][0] for level in levels]
    return dict(
        in_channels=shapes[f"{VAE}encoder.conv_in.weight"][1],
        out_channels=shapes[f"{VAE}decoder.conv_out.weight"][0],
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        layers_per_block=len(_blocks(keys, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=shapes[f"{VAE}quant_conv.weight"][0] // 2,
        **{"sample_size": 512, "scaling_factor": 0.18215, **FAMILIES[family].get("vae", {})},
    )


def text_config(shapes: Mapping[str, tuple], family: str, second: bool = False) -> dict:
    """CLIPTextConfig arguments: SD 1.x's CLIP ViT-L (transformers layout in the file), SD 2.x's OpenCLIP
    ViT-H (open_clip layout; diffusers keeps all but its last layer, as SD 2 uses), SDXL's two (the first
    a ViT-L, the `second` an OpenCLIP ViT-bigG with its projection, every layer kept)."""
    keys = list(shapes)
    if family == "v1" or (family == "xl_base" and not second):
        prefix = CLIP_L if family == "v1" else XL_CLIP_L
        vocab, hidden = shapes[f"{prefix}embeddings.token_embedding.weight"]
        positions = shapes[f"{prefix}embeddings.position_embedding.weight"][0]
        layers = len(_blocks(keys, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0]
        extra = {}
    else:
        prefix = OPEN_CLIP if family == "v2" else XL_OPEN_CLIP
        vocab, hidden = shapes[f"{prefix}token_embedding.weight"]
        positions = shapes[f"{prefix}positional_embedding"][0]
        layers = len(_blocks(keys, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
        layers -= 1 if family == "v2" else 0
        intermediate = shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0]
        extra = {"projection_dim": shapes[f"{prefix}text_projection"][1]} if second else {}
    base = FAMILIES[family]["text_2" if second else "text"]
    pad = 0 if (family == "v2" or second) else 49407
    return dict(base, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64), max_position_embeddings=positions, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=pad, **extra)


def _tokenizer_files(folder: str, pad: str) -> dict[str, dict]:
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    return {f"{folder}/tokenizer_config.json": {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special},
            f"{folder}/special_tokens_map.json": special}


def skeleton(shapes: Mapping[str, tuple], family: str, prediction_type: str) -> dict[str, dict]:
    """{relative file: JSON content} of the folder for a checkpoint of `family` with these tensor shapes."""
    sdxl = family == "xl_base"
    text = text_config(shapes, family)
    text_2 = text_config(shapes, family, second=True) if sdxl else None
    unet = unet_config(shapes, family, pooled_width=text_2["projection_dim"] if sdxl else None)
    vae = vae_config(shapes, family)
    if family == "v2" and prediction_type == "v_prediction":  # SD 2.x 768-v
        unet["sample_size"], vae["sample_size"] = 96, 768
    scheduler = dict(FAMILIES[family]["scheduler"], prediction_type=prediction_type)
    files = {
        "model_index.json": pipeline_index(sdxl),
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **unet},
        "vae/config.json": {"_class_name": "AutoencoderKL", **vae},
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **text},
        "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", **scheduler},
        **_tokenizer_files("tokenizer", FAMILIES[family]["pad_token"]),
    }
    if sdxl:
        files["text_encoder_2/config.json"] = {"architectures": ["CLIPTextModelWithProjection"],
                                               "model_type": "clip_text_model", **text_2}
        files.update(_tokenizer_files("tokenizer_2", FAMILIES[family]["pad_token_2"]))
    return files


def skeleton_folder(shapes: Mapping[str, tuple], family: str, prediction_type: str, root: Path) -> Path:
    """The skeleton written once under `root` (a folder per content, written whole then renamed, so a
    concurrent run never sees half of one); its path."""
    files = skeleton(shapes, family, prediction_type)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / f"{family}-{digest}"
    if (folder / "model_index.json").is_file():
        return folder
    vocab, merges = clip_vocabulary()
    staging = root / f".{folder.name}.{hashlib.sha256(str(id(files)).encode()).hexdigest()[:8]}.partial"
    for name, content in files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=1))
    for tokenizer in ("tokenizer", "tokenizer_2") if family == "xl_base" else ("tokenizer",):
        (staging / tokenizer / "vocab.json").write_text(json.dumps(vocab))
        (staging / tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    try:
        staging.rename(folder)
    except OSError:  # another run renamed its copy first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return folder
