"""The frozen teachers of Geometry Forcing: what they compute, how they run, and their feature cache.

- ``engine.teacher.spec``     the recipe's ``teacher`` section (:class:`TeacherConfig`), the feature keys
                              (``vggt_L<l>``, ``dino``; ``teacher.<key>`` in a batch), the input size and
                              the identities a cache is checked against. No torch model is built here.
- ``engine.teacher.live``     :class:`LiveTeacher`: frozen VGGT (+ DINOv2) run on a batch's clean frames.
- ``engine.teacher.reader``   :class:`TeacherCache`: the same call, features read from a cache.
- ``engine.teacher.cache``    the cache writer command: ``geoforge-teacher-cache --recipe ...``.
- ``engine.teacher.oracle``   :class:`OracleTeacher` (``teacher.kind: oracle``): features of synthetic clips' true
                              depth and cameras, to test the alignment mechanism without a trained VGGT.
- ``engine.teacher.random_features``  :class:`RandomTeacher` (``teacher.kind: random``): the oracle's control -
                              fixed random features of its shape, keyed by clip, frame and token; no geometry.
- ``engine.teacher.builder``  :func:`build_teacher`: the live teacher, the cache reader, the oracle or its control,
                              from the section.

Layer: above ``engine.models`` (VGGT, DINOv2) and ``engine.data`` (the windows a cache holds); the GF
objective (``engine.objectives.geometry_forcing``) only reads the feature keys. This package file
imports nothing, so ``engine.config`` can read ``engine.teacher.spec`` without building anything.
"""
