"""One builder of the GF teacher from the recipe's ``teacher`` section: live, read from its cache, the
oracle of synthetic data, or the oracle's control without geometry (random features)."""
from __future__ import annotations

from typing import Any

import torch

from geoforge.engine.teacher.live import LiveTeacher
from geoforge.engine.teacher.oracle import OracleTeacher
from geoforge.engine.teacher.random_features import RandomTeacher
from geoforge.engine.teacher.reader import TeacherCache
from geoforge.engine.teacher.spec import TeacherConfig


def build_teacher(teacher: TeacherConfig, data: Any = None, device: torch.device | str = "cpu", *,
                  seed: int | None = None, released_size: int | None = None
                  ) -> LiveTeacher | TeacherCache | OracleTeacher | RandomTeacher:
    """The oracle (``teacher.kind: oracle``), its control of random features (``teacher.kind: random``), the cache
    reader (``teacher.cache`` set) or a :class:`LiveTeacher`.

    Both return ``{"teacher.<key>": [B, Tt, h, w, C]}`` for a batch and expose ``dims`` (channels per
    key). A cache is checked against the windows the data pipeline draws, so it needs the recipe's
    ``data`` section and ``seed``; the live teacher needs neither. Whether GF runs at all (``gf.enabled``)
    is the caller's decision; ``released_size`` asks the live teacher (or the oracle, or the random control) for
    GF's published target (``gf.alignment_form: as_released``)."""
    if teacher.kind == "oracle":
        return OracleTeacher(teacher, device, released_size)
    if teacher.kind == "random":
        return RandomTeacher(teacher, device, released_size)
    if teacher.cache:
        if data is None or seed is None:
            raise ValueError("build_teacher: teacher.cache is set; pass the recipe's data section and seed, which "
                             "the cached windows depend on")
        return TeacherCache(teacher.cache, teacher, data, seed, device)
    return LiveTeacher(teacher, device, released_size)


__all__ = ["build_teacher"]
