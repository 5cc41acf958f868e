"""The only module that builds or loads models.

Three sources of weights, one result type (`Components`):

* a Hugging Face hub id (default `stable-diffusion-v1-5/stable-diffusion-v1-5`), through the normal
  Hugging Face cache: the cache is tried first, the network only when it misses;
* a local diffusers folder (`model_index.json` with `unet/`, `vae/`, `text_encoder/`, `tokenizer/`);
* one `.safetensors` checkpoint in the original Stable Diffusion layout;

plus `tiny-random`: an SD-shaped model with random weights built offline in a fraction of a second, for
tests and the demo. Its output is noise and is always labelled as such.

The models around the diffusion model are loaded here too, each by one function that never downloads
unless the user named a hub model: the captioner of `diffferv caption` (`load_captioner`), and for
`diffferv eval` dlib's face models (`load_face_backend`), face-alignment (`load_landmark_backend`),
LPIPS (`load_lpips`), an attribute classifier (`load_attribute_classifier`) and CLIP (`load_clip`).

Algorithms never load anything: they take the modules of a `Components`, or the loaded model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffferv_cli.config import DEFAULT_MODEL
from diffferv_cli.errors import UserError

TINY_RANDOM = "tiny-random"

# SD1.5's noise schedule; every model here is sampled with it.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@dataclass
class Components:
    """The modules of a Stable Diffusion 1.x model, frozen for inference unless training."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict
    model_id: str
    fingerprint: str  # identifies the weights; part of every cache key
    is_random: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def label(self) -> str:
        if self.is_random:
            return f"{self.model_id} (RANDOM WEIGHTS: output is noise, not a meaningful edit)"
        return self.model_id

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Components:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self


DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given (checked: a known kind that this machine has), else cuda > mps > cpu."""
    if requested and requested != "auto":
        kind, _, index = requested.strip().lower().partition(":")
        if kind not in ("cpu", "cuda", "mps") or (index and (not index.isdigit() or kind != "cuda")):
            raise UserError(f"Unknown device {requested!r}; use {DEVICE_NAMES}.")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {requested} was asked for but CUDA is not available on this machine.")
            count = torch.cuda.device_count()
            if index and int(index) >= count:
                raise UserError(f"--device {requested}: this machine has {count} CUDA device(s), "
                                f"cuda:0 to cuda:{count - 1}.")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
            raise UserError(f"--device {requested} was asked for but MPS (Apple GPU) is not available here.")
        return torch.device(f"{kind}:{int(index)}" if index else kind)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp16 on GPUs, fp32 on CPU, unless asked otherwise."""
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if requested and requested != "auto":
        if requested not in names:
            raise UserError(f"Unknown dtype {requested!r}; use one of fp32, fp16, bf16.")
        return names[requested]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


# --------------------------------------------------------------------------------------------------
# tiny-random: real diffusers/transformers classes at toy size, built offline
# --------------------------------------------------------------------------------------------------

def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each character alone and as a word end: every text tokenizes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    alphabet = [chr(c) for c in codes]
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77)


def build_tiny_random(seed: int = 0) -> Components:
    """An SD1.5-shaped model with random weights (UNet (32, 64) channels, 2 attention grids; VAE /8;
    CLIP text hidden 32). Deterministic for a seed; builds in well under a second."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(SD15_SCHEDULER),
        model_id=TINY_RANDOM,
        fingerprint=f"{TINY_RANDOM}-v1-seed{seed}",
        is_random=True,
    )


# Stable Diffusion 1.5's UNet (the diffusers defaults fill in the rest: 4 channels in and out, 2 layers
# per block, CrossAttnDownBlock2D x3 + DownBlock2D, ...).
SD15_UNET_CONFIG = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                        block_out_channels=(320, 640, 1280, 1280))


def build_full_size_random(seed: int = 0) -> Components:
    """Full-size SD1.5 architecture with random weights (for benchmarks: real cost, no download).
    Uses the real CLIP tokenizer shape only through the tiny byte tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                           num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77)
        )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(unet, vae, text_encoder, tokenizer, dict(SD15_SCHEDULER),
                      model_id="sd15-shaped-random", fingerprint=f"sd15-shaped-random-seed{seed}",
                      is_random=True)


# --------------------------------------------------------------------------------------------------
# real weights
# --------------------------------------------------------------------------------------------------

def _not_available(model: str, reason: str) -> UserError:
    return UserError(
        f"Model {model!r} is not available ({reason}); pass --model with a local diffusers folder or a "
        f".safetensors checkpoint, or download it once with network access (default: {DEFAULT_MODEL})."
    )


def _folder_fingerprint(folder: Path) -> str:
    """Configs by content, weight files by name, size and mtime (hashing gigabytes would take minutes)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if path.suffix in (".json", ".txt"):
            digest.update(rel.encode() + path.read_bytes())
        else:
            stat = path.stat()
            digest.update(f"{rel}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def _load_from_pretrained(source: str, local_only: bool, revision: str | None, dtype: torch.dtype) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common: dict[str, Any] = dict(local_files_only=local_only)
    if revision:
        common["revision"] = revision
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **common)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **common)
    return unet, vae, text_encoder, tokenizer


def load_components(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
) -> Components:
    """Load `model` (hub id, folder, `.safetensors` file or `tiny-random`) onto a device.

    Raises `UserError` with one sentence when the model cannot be had."""
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    if model == TINY_RANDOM:
        return build_tiny_random().to(torch_device, torch.float32 if dtype in (None, "auto") else torch_dtype)

    path = Path(model).expanduser()
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise _not_available(model, "no such file")
        comps = _load_single_file(path, torch_dtype)
    elif path.is_dir():
        if not (path / "unet").is_dir():
            raise _not_available(model, "the folder has no unet/ subfolder, so it is not a diffusers model")
        try:
            parts = _load_from_pretrained(str(path), True, None, torch_dtype)
        except (OSError, ValueError) as err:
            raise _not_available(model, f"the folder could not be read: {str(err).splitlines()[0]}") from err
        comps = Components(*parts, scheduler_config=dict(SD15_SCHEDULER), model_id=str(path.resolve()),
                           fingerprint="folder-" + _folder_fingerprint(path))
    else:
        if model.count("/") != 1 or model.startswith((".", "/", "~")):
            raise _not_available(model, "it is neither a file, a folder nor a hub id like owner/name")
        comps = _load_hub(model, revision, torch_dtype)
    for module in (comps.unet, comps.vae, comps.text_encoder):
        module.eval().requires_grad_(False)
    return comps.to(torch_device)


HUB_PROBE_SECONDS = 5.0  # how long to wait for any answer from the hub before saying it cannot be reached


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value (huggingface_hub's own rule)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> tuple[bool, str]:
    """(True, "") when the Hugging Face endpoint answers anything at all within `timeout` seconds, else
    (False, why). One request, no retries, through huggingface_hub's own HTTP session (so its proxy and
    endpoint settings apply); run in a helper thread, so that a name lookup that hangs cannot hold the
    caller past `timeout` either."""
    import threading

    from huggingface_hub import constants, get_session

    answer: dict[str, str] = {}

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answer["ok"] = ""
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
            answer["error"] = (str(err).splitlines() or [type(err).__name__])[0] or type(err).__name__

    thread = threading.Thread(target=probe, name="diffferv-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in answer:
        return True, ""
    return False, answer.get("error", f"no answer within {timeout:g} s")


def _load_hub(model: str, revision: str | None, dtype: torch.dtype) -> Components:
    """The local Hugging Face cache first; the network only when the model is not there, HF_HUB_OFFLINE
    is not set and one quick request shows that the hub answers, so that a machine without network fails
    in seconds rather than after the download's retries."""
    parts = None
    if _in_hub_cache(model, revision):  # asked without importing diffusers: the failure path stays quick
        try:
            parts = _load_from_pretrained(model, True, revision, dtype)
        except (OSError, ValueError):  # partly cached: the hub may complete it
            parts = None
    if parts is None:
        if hub_offline():
            raise _not_available(model, "not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        reachable, why = hub_reachable()
        if not reachable:
            raise _not_available(model, f"not in the Hugging Face cache and the hub cannot be reached: {why}") from None
        try:
            parts = _load_from_pretrained(model, False, revision, dtype)
        except (OSError, ValueError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise _not_available(model, f"the download from the hub failed: {reason}") from None
    commit = _hub_commit(model, revision)
    return Components(*parts, scheduler_config=dict(SD15_SCHEDULER), model_id=model,
                      fingerprint=f"hub-{model}@{commit or revision or 'main'}")


def _in_hub_cache(model: str, revision: str | None) -> bool:
    """Whether the local Hugging Face cache holds the model's UNet config (the rest is checked on load)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "unet/config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - an unusable cache is a cache without the model
        return False


def _hub_commit(model: str, revision: str | None) -> str | None:
    """The commit hash the cached snapshot resolves to, when the cache knows it."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json", revision=revision)
        if isinstance(cached, str):
            return Path(cached).parent.name
    except Exception:  # noqa: BLE001 - only a label for the cache key
        return None
    return None


def _load_single_file(path: Path, dtype: torch.dtype) -> Components:
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=dtype, safety_checker=None,
                                                        load_safety_checker=False)
    except Exception as err:  # noqa: BLE001 - diffusers raises many types here; all mean "cannot load"
        raise _not_available(str(path), f"the checkpoint could not be loaded: {str(err).splitlines()[0]}") from err
    stat = path.stat()
    return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(SD15_SCHEDULER),
                      model_id=str(path.resolve()),
                      fingerprint=f"file-{path.name}-{stat.st_size}-{int(stat.st_mtime)}")


def default_model_cached(model: str = DEFAULT_MODEL) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "unet/config.json"), str)
    except Exception:  # noqa: BLE001 - doctor only reports
        return False


def save_components(comps: Components, folder: Path) -> None:
    """Write a diffusers-layout folder that `load_components(folder)` reads back."""
    folder.mkdir(parents=True, exist_ok=True)
    comps.unet.save_pretrained(folder / "unet")
    comps.vae.save_pretrained(folder / "vae")
    comps.text_encoder.save_pretrained(folder / "text_encoder")
    comps.tokenizer.save_pretrained(folder / "tokenizer")
    from diffusers import DDIMScheduler

    DDIMScheduler(**comps.scheduler_config).save_pretrained(folder / "scheduler")
    index = {
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
    from diffferv_cli.files import atomic_write_json

    atomic_write_json(folder / "model_index.json", index)


# --------------------------------------------------------------------------------------------------
# models around the diffusion model: captioning and evaluation
# --------------------------------------------------------------------------------------------------

def load_captioner(model: str, device: str = "auto"):
    """The transformers `image-text-to-text` pipeline for `model` (hub id or local folder); UserError
    when unavailable."""
    from transformers import pipeline

    torch_device = pick_device(device)
    try:
        return pipeline("image-text-to-text", model=model, device=torch_device)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"Captioning model {model!r} cannot be loaded ({reason}); pass --model with a local "
                        "folder or a hub id that is cached.") from None


DLIB_MODEL_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}
DLIB_INSTALL_HINT = "pip install dlib-bin face-recognition-models"
# What face-alignment 1.4/1.5 fetch on first use (torch hub cache, checkpoints/).
FACE_ALIGNMENT_WEIGHTS = ("2DFAN4-cd938726ad.zip", "s3fd-619a316812.pth")
# What torchvision's alexnet(pretrained=True) loads for LPIPS.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def dlib_model_dir() -> Path | None:
    """The models/ folder of the installed face-recognition-models package, without importing it (its
    `__init__` needs `pkg_resources`, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@functools.lru_cache(maxsize=4)
def load_face_backend(upsample: int = 0):
    """dlib's face models as an `evaluation.faces.FaceBackend`, built once per process (~1 s), or the
    reason they cannot be."""
    from diffferv_cli.evaluation.faces import DlibFaces, FaceBackend

    if importlib.util.find_spec("dlib") is None:
        return FaceBackend(None, f"dlib is not installed ({DLIB_INSTALL_HINT})")
    model_dir = dlib_model_dir()
    if model_dir is None:
        return FaceBackend(None, f"face-recognition-models is not installed ({DLIB_INSTALL_HINT})")
    missing = [name for name in DLIB_MODEL_FILES.values() if not (model_dir / name).is_file()]
    if missing:
        return FaceBackend(None, f"{', '.join(missing)} missing from {model_dir} (reinstall face-recognition-models)")
    try:
        import dlib

        analyzer = DlibFaces(dlib.get_frontal_face_detector(),
                             dlib.shape_predictor(str(model_dir / DLIB_MODEL_FILES["landmarks"])),
                             dlib.face_recognition_model_v1(str(model_dir / DLIB_MODEL_FILES["recognition"])),
                             upsample=upsample)
    except Exception as err:  # noqa: BLE001 - a broken install is reported, not raised
        return FaceBackend(None, f"dlib could not load its models ({type(err).__name__}: {err})")
    return FaceBackend(analyzer)


def load_landmark_backend(device: str = "cpu"):
    """(`evaluation.faces.FaceAlignmentLandmarks`, None) when face-alignment is installed and its weights
    are cached, else (None, reason). Never downloads."""
    if importlib.util.find_spec("face_alignment") is None:
        return None, "face-alignment is not installed (pip install face-alignment)"
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    missing = [name for name in FACE_ALIGNMENT_WEIGHTS if not (checkpoints / name).is_file()]
    if missing:
        return None, f"face-alignment weights {', '.join(missing)} are not in {checkpoints} (it would download them)"
    try:
        import face_alignment

        from diffferv_cli.evaluation.faces import FaceAlignmentLandmarks

        landmarks_type = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
        model = face_alignment.FaceAlignment(landmarks_type, device=device, face_detector="sfd")
        return FaceAlignmentLandmarks(model), None
    except Exception as err:  # noqa: BLE001
        return None, f"face-alignment could not load ({type(err).__name__}: {err})"


@functools.lru_cache(maxsize=1)
def load_lpips():
    """(LPIPS AlexNet model, None) when the `lpips` package imports and torchvision's AlexNet weights are
    already cached, else (None, reason). Never downloads."""
    if importlib.util.find_spec("lpips") is None:
        return None, "the lpips package is not installed (pip install lpips)"
    try:
        import lpips  # imports torchvision
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        return None, f"the lpips package does not import ({type(err).__name__}: {err})"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        return None, f"torchvision's AlexNet weights are not in {weights.parent} (never downloaded here)"
    return lpips.LPIPS(net="alex", verbose=False).eval(), None


def load_attribute_classifier(model: Path):
    """A transformers image-classification pipeline from a local model folder (CPU)."""
    from transformers import pipeline

    if not Path(model).exists():
        raise UserError(f"The attribute model {model} does not exist (a local folder is expected).")
    try:
        return pipeline("image-classification", model=str(model), device=-1)
    except Exception as err:  # noqa: BLE001 - a model that does not load is the user's input
        raise UserError(f"The attribute model {model} could not be used ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}).") from None


def load_clip(model: Path):
    """(CLIPModel, CLIPProcessor) from a local folder, offline."""
    from transformers import CLIPModel, CLIPProcessor

    if not Path(model).exists():
        raise UserError(f"The CLIP model {model} does not exist (a local folder is expected).")
    try:
        clip = CLIPModel.from_pretrained(str(model), local_files_only=True).eval()
        return clip, CLIPProcessor.from_pretrained(str(model), local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"The CLIP model {model} could not be used ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}).") from None
