"""The only package that builds or loads models; algorithms take the modules of a `Components`.

components  the result type          devices    device and dtype choice
families    family and scheduler     loading    hub id, folder, file -> Components
single_file original-layout files    tiny       random-weight builders (tests, demo, benchmarks)
geometry    working-size rules from configs alone (imports no torch: `probe` uses it)
skeletons   config skeletons of single files
lora        LoRA files fused into a model, a trainable LoRA for `train`
auxiliary   captioner, faces, LPIPS, CLIP, attribute classifier
pickled     pickled weight files of a folder, read with weights_only before the loaders read them
"""
