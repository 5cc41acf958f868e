"""The only package that builds or loads models; algorithms take the modules of a `Components`.

components  the result type          devices    device and dtype choice
families    family and scheduler     loading    hub id, folder, file -> Components
single_file original-layout files    tiny       random-weight builders (tests, demo, benchmarks)
lora        LoRA files fused into a model, a trainable LoRA for `train`
auxiliary   captioner, faces, LPIPS, CLIP, attribute classifier
"""

from diffferv_cli.models.components import Components
from diffferv_cli.models.devices import pick_device, pick_dtype
from diffferv_cli.models.loading import load_components
from diffferv_cli.models.tiny import TINY_RANDOM

__all__ = ["Components", "TINY_RANDOM", "load_components", "pick_device", "pick_dtype"]
