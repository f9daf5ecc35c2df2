"""GeoForge's own VGGT (facebookresearch/vggt) implementation: loads the official VGGT-1B checkpoint
unchanged and reproduces its outputs; also the frozen geometry teacher of Geometry Forcing."""
from .aggregator import Aggregator, patch_token_grid
from .config import DEFAULTS, config_from_hub, resolve_config
from .dinov2 import DINOV2_VARIANTS, DinoVisionTransformer, PatchEmbed
from .estimate import Geometry, estimate_geometry
from .geometry import closed_form_inverse_se3, unproject_depth_map_to_point_map
from .model import VGGT
from .pose_encoding import (extri_intri_to_pose_encoding, mat_to_quat, pose_encoding_to_extri_intri,
                            quat_to_mat, standardize_quaternion)
from .preprocess import load_and_preprocess_images, preprocess_images, resize_for_vggt, vggt_size

__all__ = [
    "VGGT", "Aggregator", "patch_token_grid", "DEFAULTS", "resolve_config", "config_from_hub",
    "DINOV2_VARIANTS", "DinoVisionTransformer", "PatchEmbed",
    "Geometry", "estimate_geometry", "closed_form_inverse_se3", "unproject_depth_map_to_point_map",
    "extri_intri_to_pose_encoding", "pose_encoding_to_extri_intri", "quat_to_mat", "mat_to_quat",
    "standardize_quaternion",
    "load_and_preprocess_images", "preprocess_images", "resize_for_vggt", "vggt_size",
]
