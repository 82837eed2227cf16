"""The diffusers integration: denoiser and layer hooks, model families, and the public verbs."""
