"""Offline load of a full-size SD 1.5 model as one original-layout .safetensors file against its diffusers
folder form (random weights, fp16 on disk), with an empty Hugging Face cache; and the cost of the file's
content fingerprint on first use and on every later use.

    python bench/bench_single_file.py [--dtype fp16] [--repeats 2]

Each load runs in a fresh subprocess (no warm module or page-cache advantage for the second form beyond
what the OS keeps), the best of --repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TESTS, report  # noqa: E402

LOAD = """
import json, sys, time
start = time.perf_counter()
from diffferv_cli.models.loading import load_components
comps = load_components(sys.argv[1], device="cpu", dtype=sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start, "fingerprint": comps.fingerprint}))
"""


def _timed_load(model: str, dtype: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, model, dtype], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    import torch
    from ldm_layout import write_single_file

    from diffferv_cli.models.loading import save_components
    from diffferv_cli.models.tiny import build_full_size_random

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        comps = build_full_size_random().to("cpu", torch.float16)  # both forms hold the same fp16 weights
        save_components(comps, root / "folder")
        path = write_single_file(root / "sd15.safetensors", comps.unet, comps.vae, comps.text_encoder)
        del comps
        env = {**os.environ, "HF_HOME": str(root / "empty-hf-home"), "HF_HUB_OFFLINE": "1",
               "DIFFFERV_CACHE": str(root / "cache")}
        rows = []
        first = _timed_load(str(path), args.dtype, env)  # hashes the file, writes the skeleton
        rows.append({"form": "single file, first use (hash + skeleton)", "seconds": round(first["seconds"], 2)})
        for form, model in (("single file, later use", str(path)), ("diffusers folder", str(root / "folder"))):
            best = min(_timed_load(model, args.dtype, env)["seconds"] for _ in range(args.repeats))
            rows.append({"form": form, "seconds": round(best, 2)})
        from diffferv_cli.models import single_file

        os.environ["DIFFFERV_CACHE"] = str(root / "fingerprint-cache")
        start = time.perf_counter()
        single_file.content_fingerprint(path)
        hashed = time.perf_counter() - start
        start = time.perf_counter()
        single_file.content_fingerprint(path)
        remembered = time.perf_counter() - start
        rows.append({"form": f"fingerprint of {path.stat().st_size / 1e9:.2f} GB, first use", "seconds": round(hashed, 3)})
        rows.append({"form": "fingerprint, later use", "seconds": round(remembered, 4)})
    report("single_file", rows=rows, settings={"dtype": args.dtype, "repeats": args.repeats,
                                                "model": "SD 1.5 architecture, random weights, fp16 on disk"})


if __name__ == "__main__":
    main()
