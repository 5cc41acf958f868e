"""The diffusion job: VAE, DDIM inversion, preservation features, prompts, presets, edit sampling, the inversion cache."""
