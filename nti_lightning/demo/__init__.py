"""A small Stable-Diffusion-shaped model trained on procedural shapes, and its training code.

`shapes` generates the captioned images (and their masks, for checking results); `train` trains
the VAE and the text-conditioned UNet with Lightning (`nti train-demo`). The trained weights ship
in `nti_lightning/assets/shapes` and load as `load_pipeline("shapes")`.
"""
