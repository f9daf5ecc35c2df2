"""DFoT's U-ViT3D (pose-conditioned, pixel space), the backbone of the released DFoT / Geometry Forcing
RealEstate10K models: :class:`UViT3D`, its config and DFoT's ray-encoding camera condition."""
from geoforge.engine.models.uvit3d.config import RE10K, UViT3DConfig
from geoforge.engine.models.uvit3d.model import UViT3D, num_params
from geoforge.engine.models.uvit3d.rays import poses16_from_cameras, ray_condition

__all__ = ["UViT3D", "UViT3DConfig", "RE10K", "num_params", "ray_condition", "poses16_from_cameras"]
