"""VideoGPA post-training (arXiv 2601.23286): align a video generator to 3D consistency with DPO.

Stages (``engine.videogpa.pipeline``): ``generate`` K candidates per conditioning input (``generate``),
``score`` their 3D consistency with a geometry teacher (``score``, also a standalone scorer:
``geoforge-score``), build ``pairs`` (``pairs``), and ``train`` the policy with
Diffusion-DPO and LoRA adapters (``train_dpo``; the loss is ``engine.objectives.dpo``). Policies
(``policy``: the own DiT; ``diffusers_policy``: CogVideoX-I2V, Wan2.2-TI2V) share one interface.
The recipe section is ``engine.videogpa.config.VideoGPAConfig``. Submodules are imported on use, so
importing this package (as ``engine.config`` does) stays cheap.
"""
