"""Training data for the specialization stage: captioned images from folders, manifests or tar shards.

Three layouts are read, for the face set and for the prior set alike:

* an image folder (searched recursively) with a sidecar caption per image: `photo.jpg` + `photo.txt`;
* the same folder with a caption manifest instead (`--captions FILE`): JSONL lines such as
  `{"file": "sub/photo.jpg", "text": "a man with a beard"}` or a CSV with a `file,text` header; `file`
  is relative to the folder (a bare file name is matched too); `image`/`caption` are accepted as keys;
* webdataset-style tar shards (`DIR/*.tar` or one `.tar` file): members grouped by key (the member name
  up to the first dot of its base name), an image member plus a `.txt` caption or a `.json` with
  "caption"/"text". Shards are streamed: the scan reads member headers and captions, and an image is
  read later by seeking to its bytes; nothing is unpacked.

Which image the n-th training sample shows is a pure function of n (`SamplePlan`), so a run resumed at
sample n sees exactly what an uninterrupted run would have seen. The prior share is deterministic: sample
n is a prior pair when floor((n+1)·ratio) > floor(n·ratio), so every window of k samples holds
k·ratio ± 1 prior pairs. Each pool is walked in a fresh seeded permutation per epoch.

Augmentation (faces only, paper section 4.1): a zoom-in drawn from [1, max_zoom] and a rotation from
±max_rotation degrees about the image centre, borders filled by reflection, after the resize/crop to the
training resolution. Prior images are only resized and cropped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffferv_cli.errors import UserError
from diffferv_cli.files import open_image, read_small_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption")
FILE_KEYS = ("file", "image", "path")
MAX_MANIFEST_BYTES = 256 << 20
MAX_CAPTION_BYTES = 64 << 10  # one caption (sidecar file or shard member); a larger one is not a caption
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageItem:
    """One captioned image: a file, or `size` bytes at `offset` inside a tar shard."""

    path: Path
    caption: str
    offset: int = -1  # -1: `path` is the image file itself
    size: int = 0
    name: str = ""  # what messages call it

    def read_bytes(self) -> bytes:
        if self.offset < 0:
            return self.path.read_bytes()
        with open(self.path, "rb") as shard:
            shard.seek(self.offset)
            return shard.read(self.size)

    @property
    def label(self) -> str:
        return self.name or str(self.path)


@dataclass(frozen=True)
class ImageSet:
    root: Path
    items: tuple[ImageItem, ...]

    def __len__(self) -> int:
        return len(self.items)


# ------------------------------------------------------------------------------------------ scanning


def scan_images(root: Path, captions: Path | None = None, option: str = "--captions") -> ImageSet:
    """All captioned images under `root` (folder or tar shards). `option` names the manifest option in
    messages. Raises UserError for a missing or empty source and for images without a caption."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root} does not exist.")
    shards = [root] if root.is_file() and root.suffix == ".tar" else sorted(root.glob("*.tar")) if root.is_dir() else []
    if root.is_file() and not shards:
        raise UserError(f"{root} is a file; give a folder of images or .tar shards.")
    if shards:
        items = [item for shard in shards for item in _scan_shard(shard)]
        missing = [name for name, item in items if item is None]
        found = [item for _, item in items if item is not None]
    else:
        files = image_files(root)
        table = _read_manifest(captions, root) if captions else None
        found, missing = [], []
        for file in files:
            relative = file.relative_to(root).as_posix()
            text = _caption_for(file, relative, table)
            if text is None:
                missing.append(relative)
            else:
                found.append(ImageItem(file, text, name=relative))
    if not found and not missing:
        raise UserError(f"No images found in {root} (looked for {', '.join(IMAGE_SUFFIXES)} files and .tar shards).")
    if missing:
        examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(
            f"{len(missing)} of {len(missing) + len(found)} images in {root} have no caption ({examples}); "
            f"write sidecar .txt captions (`diffferv caption {root}` does it) or pass {option} FILE "
            "(JSONL or CSV with file,text)."
        )
    return ImageSet(root, tuple(found))


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, by suffix), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _caption_for(file: Path, relative: str, table: dict[str, str] | None) -> str | None:
    if table is not None:
        text = table.get(relative, table.get(file.name))
    else:
        sidecar = file.with_suffix(".txt")
        text = (read_small_file(sidecar, MAX_CAPTION_BYTES, "caption file").decode("utf-8", errors="replace")
                if sidecar.is_file() else None)
    text = text.strip() if text else None
    return text or None


def _read_manifest(manifest: Path, root: Path) -> dict[str, str]:
    """{relative path or file name: caption} from a JSONL or CSV manifest."""
    manifest = Path(manifest)
    rows: Iterable[dict]
    text = read_small_file(manifest, MAX_MANIFEST_BYTES, "caption manifest").decode("utf-8", errors="replace")
    try:
        if manifest.suffix.lower() in (".jsonl", ".json"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
    except (json.JSONDecodeError, csv.Error, RecursionError) as err:
        raise UserError(f"Cannot read caption manifest {manifest} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}).") from None
    table = {}
    for number, row in enumerate(rows, 1):
        where = f"Caption manifest {manifest}, row {number}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object such as {{\"file\": \"a.jpg\", \"text\": \"...\"}}, "
                            f"not {_json_type(row)}.")
        file = _field(row, FILE_KEYS, where)
        caption = _field(row, CAPTION_KEYS, where)
        if file is None or caption is None:
            raise UserError(f"{where}: needs a file and a text field "
                            f"(one of {'/'.join(FILE_KEYS)} and {'/'.join(CAPTION_KEYS)}).")
        path = Path(file)
        if path.is_absolute():
            try:
                path = path.relative_to(root.resolve())
            except ValueError:
                path = Path(path.name)
        table[path.as_posix()] = str(caption)
    return table


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _field(row: dict, keys: tuple[str, ...], where: str) -> str | None:
    """The first of `keys` present in `row` (None when none is), which must be a non-empty string."""
    for key in keys:
        if key in row:
            value = row[key]
            if not isinstance(value, str):
                raise UserError(f"{where}: {key!r} must be a string, not {_json_type(value)}.")
            if value.strip():
                return value
    return None


def _scan_shard(shard: Path) -> list[tuple[str, ImageItem | None]]:
    """(key, item or None when the key has no caption) for each image of a webdataset-style shard."""
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:  # uncompressed: members can be read by offset later
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                extension = "." + extension.lower() if dot else ""
                if extension in IMAGE_SUFFIXES:
                    images[key] = member
                elif extension in (".txt", ".caption", ".json") and member.size <= MAX_CAPTION_BYTES:
                    raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    text = _json_caption(raw) if extension == ".json" else raw
                    if text and text.strip():
                        captions[key] = text.strip()
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"Cannot read tar shard {shard} ({err}); shards must be uncompressed .tar files.") from err
    return [
        (f"{shard.name}:{key}",
         ImageItem(shard, captions[key], member.offset_data, member.size, name=f"{shard.name}:{member.name}")
         if key in captions else None)
        for key, member in images.items()
    ]


def _json_caption(raw: str) -> str | None:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    return next((data[k] for k in CAPTION_KEYS if isinstance(data.get(k), str) and data[k].strip()), None)


# ------------------------------------------------------------------------------------ sample plan


@dataclass(frozen=True)
class Draw:
    """What training sample n is: which pool, which image of it, and the seed of its random choices."""

    prior: bool
    index: int
    seed: tuple[int, ...]


class SamplePlan:
    """Sample n -> Draw, a pure function of (n, pool sizes, ratio, seed)."""

    def __init__(self, faces: int, prior: int, prior_ratio: float, seed: int):
        if prior_ratio > 0 and prior == 0:
            prior_ratio = 0.0
        self.faces, self.prior, self.ratio, self.seed = faces, prior, prior_ratio, seed

    def prior_before(self, n: int) -> int:
        """How many of samples 0..n-1 are prior pairs."""
        return math.floor(n * self.ratio + 1e-9)

    def __call__(self, n: int) -> Draw:
        before = self.prior_before(n)
        is_prior = self.prior_before(n + 1) > before
        pool, size, k = (1, self.prior, before) if is_prior else (0, self.faces, n - before)
        epoch, position = divmod(k, size)
        order = _permutation(self.seed, pool, epoch, size)
        return Draw(is_prior, int(order[position]), (self.seed, pool, n))


@lru_cache(maxsize=8)
def _permutation(seed: int, pool: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, pool, epoch]).permutation(size)


# --------------------------------------------------------------------------------- image handling


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 (H, W, 3); raises one of UNREADABLE for anything that is not a whole image."""
    with open_image(io.BytesIO(data)) as image:  # the pixel count is checked before decoding
        image.load()
        return np.asarray(image.convert("RGB"))


def resize_crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Short side to `size` (area filter when shrinking), then a size×size crop: random with `rng`,
    centred without."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if rng is None:
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        top, left = int(rng.integers(0, new_h - size + 1)), int(rng.integers(0, new_w - size + 1))
    return image[top:top + size, left:left + size]


def augment_face(image: np.ndarray, zoom: float, degrees: float) -> np.ndarray:
    """Zoom in by `zoom` (>= 1) and rotate by `degrees` about the centre; borders reflect."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2 - 0.5, height / 2 - 0.5), degrees, zoom)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class TrainSamples(torch.utils.data.Dataset):
    """Map-style dataset of `length` samples following a SamplePlan.

    Item: {"pixels": (3, R, R) float in [-1, 1], "caption": str, "prior": bool, "augment": (zoom, degrees),
    "skipped": list of images that could not be read}. An unreadable image is replaced by the next image
    of its pool (deterministically) and named in "skipped", so one bad file never stops a run."""

    def __init__(self, faces: ImageSet, prior: ImageSet | None, *, length: int, resolution: int,
                 prior_ratio: float, seed: int, max_zoom: float, max_rotation: float, center_crop: bool):
        self.faces, self.prior = faces, prior
        self.length, self.resolution, self.seed = length, resolution, seed
        self.max_zoom, self.max_rotation, self.center_crop = max_zoom, max_rotation, center_crop
        self.plan = SamplePlan(len(faces), len(prior) if prior else 0, prior_ratio, seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, n: int) -> dict:
        draw = self.plan(n)
        pool = self.prior if draw.prior else self.faces
        rng = np.random.default_rng(list(draw.seed))
        skipped = []
        for attempt in range(len(pool)):
            item = pool.items[(draw.index + attempt) % len(pool)]
            try:
                image = decode_image(item.read_bytes())
                break
            except UNREADABLE:
                skipped.append(item.label)
        else:
            raise UserError(f"None of the {len(pool)} images in {pool.root} can be read.")
        image = resize_crop(image, self.resolution, None if self.center_crop else rng)
        zoom, degrees = 1.0, 0.0
        if not draw.prior:
            zoom = float(rng.uniform(1.0, self.max_zoom))
            degrees = float(rng.uniform(-self.max_rotation, self.max_rotation))
            if zoom != 1.0 or degrees != 0.0:
                image = augment_face(image, zoom, degrees)
        return {"pixels": to_tensor(image), "caption": item.caption, "prior": draw.prior,
                "augment": (zoom, degrees), "skipped": skipped}


def collate(samples: list[dict]) -> dict:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "prior": torch.tensor([s["prior"] for s in samples]),
        "skipped": [name for s in samples for name in s["skipped"]],
    }
