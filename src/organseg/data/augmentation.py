"""torchio augmentation for training patches, configured from YAML.

Intensity transforms touch only the CT (``include=["image"]``), never the SOL heatmap targets,
which move with the spatial transforms like the label does.

No random left/right flip: organs come in _l/_r classes, and a flip without swapping the labels
would teach the network the wrong side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torchio as tio


@dataclass
class AugmentationConfig:
    affine_p: float = 0.3  # probability of a random scale/rotation
    scales: tuple[float, float] = (0.9, 1.1)
    degrees: tuple[float, float, float] = (10.0, 10.0, 5.0)  # around x, y, z (z: in-plane rotation)
    noise_p: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.05)  # in normalised intensity units ([-1, 1] window)
    blur_p: float = 0.1
    blur_std: tuple[float, float] = (0.0, 0.5)  # mm
    gamma_p: float = 0.0
    extra: list = field(default_factory=list)  # further tio transforms (instances), appended

    @classmethod
    def from_any(cls, value) -> AugmentationConfig | None:
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        return cls(**dict(value))

    def margin(self, patch_size) -> list[int]:
        """Extra voxels read around a patch so rotation/scaling never pulls in padding."""
        if self.affine_p <= 0:
            return [0, 0, 0]
        angle = math.radians(max(self.degrees))
        grow = 1.0 / self.scales[0] * (abs(math.cos(angle)) + abs(math.sin(angle))) - 1.0
        return [int(math.ceil(s * max(grow, 0.0) / 2)) + 1 for s in patch_size]

    def build(self) -> tio.Transform:
        transforms: list[tio.Transform] = []
        if self.affine_p > 0:
            transforms.append(
                tio.RandomAffine(
                    scales=self.scales,
                    degrees=self.degrees,
                    isotropic=False,
                    default_pad_value="minimum",
                    p=self.affine_p,
                )
            )
        if self.blur_p > 0:
            transforms.append(tio.RandomBlur(std=self.blur_std, p=self.blur_p, include=["image"]))
        if self.noise_p > 0:
            transforms.append(tio.RandomNoise(std=self.noise_std, p=self.noise_p, include=["image"]))
        if self.gamma_p > 0:
            transforms.append(tio.RandomGamma(p=self.gamma_p, include=["image"]))
        transforms.extend(self.extra)
        return tio.Compose(transforms)
