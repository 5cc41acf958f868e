"""The models around the diffusion model, each loaded by one function that never downloads unless the user
named a hub model: the captioner of `diffferv caption` (`load_captioner`), and for `diffferv eval` dlib's
face models (`load_face_backend`), face-alignment (`load_landmark_backend`), LPIPS (`load_lpips`), an
attribute classifier (`load_attribute_classifier`) and CLIP (`load_clip`)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from pickle import UnpicklingError

import torch

from diffferv_cli.errors import UserError
from diffferv_cli.models.devices import pick_device
from diffferv_cli.models.pickled import refuse_foreign_weights


def load_captioner(model: str, device: str = "auto"):
    """The transformers `image-text-to-text` pipeline for `model` (hub id or local folder); UserError
    when unavailable, or when a pickled weight file of it is not a plain state dict (never run)."""
    from transformers import pipeline

    torch_device = pick_device(device)
    folder = Path(model).expanduser() if Path(model).expanduser().is_dir() else _hub_snapshot(model)
    if folder is not None:
        refuse_foreign_weights(f"Captioning model {model!r}", [folder])
    try:
        return pipeline("image-text-to-text", model=model, device=torch_device)
    except UnpicklingError:  # transformers reads pickles with weights_only: refused, never run
        raise UserError(f"Captioning model {model!r} cannot be loaded: a weight file of it is a pickle that could "
                        "run code; convert it to .safetensors.") from None
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"Captioning model {model!r} cannot be loaded ({reason}); pass --model with a local "
                        "folder or a hub id that is cached.") from None


def _hub_snapshot(model: str) -> Path | None:
    """The folder of the cached snapshot of hub id `model`, when the local cache has one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - not a hub id, or an unusable cache: nothing cached to look at
        return None
    return Path(cached).parent if isinstance(cached, str) else None


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
    refuse_foreign_weights(f"The attribute model {model}", [Path(model)])
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
    refuse_foreign_weights(f"The CLIP model {model}", [Path(model)])
    try:
        clip = CLIPModel.from_pretrained(str(model), local_files_only=True).eval()
        return clip, CLIPProcessor.from_pretrained(str(model), local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"The CLIP model {model} could not be used ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}).") from None
