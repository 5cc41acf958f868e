"""Sidecar captions for a training folder, written by an image-text-to-text model (paper: Pixtral).

Any model that transformers' `image-text-to-text` pipeline accepts works: chat models (Pixtral, LLaVA,
Qwen-VL, ...) get the image and an instruction as a user message; plain captioners (BLIP, GIT) get the
image and a text prefix to continue ("a photo of"), and the caption is prefix + continuation.
`photo.jpg` gets `photo.txt`; existing captions are kept unless `overwrite`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffferv_cli.errors import UserError
from diffferv_cli.files import atomic_write_text, open_image
from diffferv_cli.training.data import IMAGE_SUFFIXES, UNREADABLE, image_files

DEFAULT_INSTRUCTION = ("Write one short caption for this photo, starting with 'a photo of'. Name the person's "
                       "apparent age and gender, hair, facial expression and any glasses, beard or make-up.")
DEFAULT_PREFIX = "a photo of"


@dataclass
class CaptionResult:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # already had a caption
    unreadable: list[Path] = field(default_factory=list)


def caption_images(pipe, images: list, *, instruction: str = DEFAULT_INSTRUCTION, prefix: str = DEFAULT_PREFIX,
                   max_new_tokens: int = 60) -> list[str]:
    """One caption per PIL image."""
    processor = getattr(pipe, "processor", None)
    if getattr(processor, "chat_template", None):
        chats = [[{"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": instruction}]}] for image in images]
        outputs = pipe(text=chats, max_new_tokens=max_new_tokens, return_full_text=False)
        texts = [_first(output)["generated_text"] for output in outputs]
    else:
        outputs = pipe(images=images, text=[prefix] * len(images), max_new_tokens=max_new_tokens,
                       return_full_text=False)
        texts = [f"{prefix} {_first(output)['generated_text'].strip()}" for output in outputs]
    return [" ".join(text.split()) for text in texts]


def _first(output):
    return output[0] if isinstance(output, list) else output


def caption_folder(folder: Path, pipe, *, overwrite: bool = False, batch_size: int = 4,
                   instruction: str = DEFAULT_INSTRUCTION, prefix: str = DEFAULT_PREFIX, max_new_tokens: int = 60,
                   progress: Callable[[int, int], None] | None = None) -> CaptionResult:
    """Write `<image>.txt` beside every image under `folder` (recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images.")
    files = image_files(folder)
    if not files:
        raise UserError(f"No images found in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    result = CaptionResult()
    todo = []
    for file in files:
        if file.with_suffix(".txt").is_file() and not overwrite:
            result.kept.append(file)
        else:
            todo.append(file)
    for begin in range(0, len(todo), batch_size):
        batch, images = [], []
        for file in todo[begin:begin + batch_size]:
            try:
                with open_image(file) as image:
                    images.append(image.convert("RGB"))
                batch.append(file)
            except UNREADABLE:
                result.unreadable.append(file)
        if images:
            captions = caption_images(pipe, images, instruction=instruction, prefix=prefix,
                                      max_new_tokens=max_new_tokens)
            for file, caption in zip(batch, captions, strict=True):
                atomic_write_text(file.with_suffix(".txt"), caption + "\n")
                result.written.append(file)
        if progress is not None:
            progress(min(begin + batch_size, len(todo)), len(todo))
    return result
