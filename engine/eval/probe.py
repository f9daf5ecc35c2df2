"""A linear probe of geometry in a video DiT's tokens: closed-form ridge regression from one block's tokens to each
token's depth and world point, fitted on training clips, scored (R^2) on held-out clips.

The question (Geometry Forcing's probing analysis): does block L of the DiT encode where each token is in 3D, and
does aligning it with a geometry teacher make it encode more? For data whose geometry is known (synthetic scenes:
true depth and cameras) the probe measures it:

- **features**: ``dit(x_t, t, intrinsics=..., extrinsics=..., return_features=(block,))`` (1-based block, its
  output after the residual, ``[B, T', H/p, W/p, D]``); ``x_t = (1 - t) x0 + t eps``
  (:func:`engine.objectives.flow_matching.add_noise`) with frame 0 kept clean as the context (t = 0 there, as in
  sampling) and the other frames at flow time ``t``; ``eps`` from a fixed generator (``seed``), the same for every
  ``t``. Only the token frames after the context are probed (they are the ones at noise level ``t``).
- **targets**: per token, :func:`engine.teacher.oracle.geometry_features` with ``freqs=0`` on the DiT's token grid:
  the mean over the token's cell of the world point ``X / SCENE_SCALE`` (3 values, in frame 0's camera, where the
  data puts the world) and of the log depth; frames averaged over a temporal patch.
- **ridge** (:func:`fit_ridge`, float64): features standardised with the training rows' mean and standard
  deviation (a constant feature keeps scale 1), a bias column that is not penalised, weights
  ``W = (A^T A + lambda P)^-1 A^T Y`` for ``A = [Z, 1]`` and ``P = diag(1, ..., 1, 0)`` - one solve for all four
  targets. ``lambda`` is given, or chosen (:func:`choose_lambda`) from ``lambda / N_train`` in ``LAMBDA_GRID``
  by 4-fold cross-validation on the training rows grouped by clip (a clip's tokens never on both sides of a
  fold), maximising the mean R^2 over the four targets; one lambda per noise level.
- **score** (:func:`r2_score`): ``R^2 = 1 - SS_res / SS_tot`` per target on the held-out rows, ``SS_tot`` about the
  held-out mean: 1 is perfect, 0 is predicting the held-out mean, below 0 worse than that. Reported: ``depth``
  (log depth), ``world`` (the mean of the x, y, z R^2) and each of ``x``, ``y``, ``z``.

Cost: one DiT forward per clip and noise level (chunks of ``chunk`` clips, no gradient) plus a ``D+1``-square
solve per lambda and fold; a few seconds for gf_small's 128-wide DiT on 32 + 16 clips of 8 frames on a CPU.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from geoforge.engine.objectives.flow_matching import add_noise
from geoforge.engine.teacher.oracle import geometry_features

TARGETS = ("x", "y", "z", "depth")        # the columns of the targets: X / SCENE_SCALE (3), log depth
LAMBDA_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # lambda / N_train tried by choose_lambda
FOLDS = 4


@dataclass
class Ridge:
    """A fitted probe: the training standardisation (``mean``, ``std`` [D]), ``weight [D + 1, K]`` (the last row is
    the bias) and the ``lam`` it was fitted with; all float64."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    lam: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` -> ``[N, K]`` float64."""
        return augment((x.double() - self.mean) / self.std) @ self.weight


def augment(z: torch.Tensor) -> torch.Tensor:
    """``[Z, 1]``: the bias column appended."""
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of the rows of ``x [N, D]`` in float64; a constant column gets std 1."""
    x = x.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> Ridge:
    """Ridge regression of ``y [N, K]`` on ``x [N, D]`` (module docstring): standardised features, unpenalised bias,
    ``W = (A^T A + lam P)^-1 A^T Y``."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_ridge: x [N, D] and y [N, K] with the same N, got {tuple(x.shape)}, {tuple(y.shape)}")
    if lam < 0:
        raise ValueError(f"fit_ridge: lambda must be >= 0, got {lam}")
    mean, std = standardisation(x)
    a = augment((x.double() - mean) / std)
    return Ridge(mean, std, _solve(a.T @ a, a.T @ y.double(), lam), float(lam))


def _solve(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    penalty = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
    penalty[-1] = 0.0                                          # the bias is not shrunk
    lhs = gram + lam * torch.diag(penalty)
    try:
        return torch.linalg.solve(lhs, rhs)
    except RuntimeError:                                       # singular (lam 0 on collinear features)
        return torch.linalg.lstsq(lhs, rhs).solution


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per column of ``y [N, K]``: ``1 - SS_res / SS_tot`` (``SS_tot`` about the column's mean), float64 ``[K]``."""
    y, pred = y.double(), pred.double()
    ss_res = (y - pred).square().sum(dim=0)
    ss_tot = (y - y.mean(dim=0)).square().sum(dim=0)
    return 1.0 - ss_res / ss_tot.clamp_min(1e-300)


def choose_lambda(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, grid: Sequence[float] = LAMBDA_GRID,
                  folds: int = FOLDS) -> float:
    """The ``lambda`` (``grid`` value x the number of training rows) of the best mean held-out-fold R^2 over the
    targets, by ``folds``-fold cross-validation with rows grouped by ``groups [N]`` (clip ids; fold of group g:
    its rank modulo ``folds``). With fewer than 2 groups: the smallest."""
    ids = torch.unique(groups)
    n = x.shape[0]
    if len(ids) < 2:
        return grid[0] * n
    folds = min(folds, len(ids))
    fold_of = {int(g): i % folds for i, g in enumerate(ids.tolist())}
    fold = torch.tensor([fold_of[int(g)] for g in groups.tolist()])
    scores = torch.zeros(len(grid), dtype=torch.float64)
    for f in range(folds):
        train, test = fold != f, fold == f
        mean, std = standardisation(x[train])
        a = augment((x[train].double() - mean) / std)
        gram, rhs = a.T @ a, a.T @ y[train].double()
        a_test = augment((x[test].double() - mean) / std)
        for i, rel in enumerate(grid):
            w = _solve(gram, rhs, rel * int(train.sum()))
            scores[i] += r2_score(a_test @ w, y[test]).mean()
    return float(grid[int(scores.argmax())] * n)


def fit_and_score(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                  lam: float | None = None, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Fit on the training rows (``lam`` given, or :func:`choose_lambda` with ``groups``, default one group per
    row), score on the test rows: ``(R^2 [K], lambda)``."""
    if lam is None:
        lam = choose_lambda(x_train, y_train, groups if groups is not None else torch.arange(x_train.shape[0]))
    ridge = fit_ridge(x_train, y_train, lam)
    return r2_score(ridge.predict(x_test), y_test), lam


# ----------------------------------------------------------------------------- the DiT side
def context_token_frames(context: int, temporal_patch: int) -> int:
    """Token frames that hold a context frame (not probed)."""
    return -(-context // temporal_patch)


@torch.no_grad()
def token_features(dit: torch.nn.Module, batch: Mapping[str, torch.Tensor], t: float, block: int,
                   generator: torch.Generator, context: int = 1) -> torch.Tensor:
    """Block ``block``'s tokens ``[B, T', g, g, D]`` (float32, CPU) for the clips of ``batch`` (``frames [B, T, 3, H,
    W]`` in [0, 1], ``intrinsics``, ``extrinsics``) noised to flow time ``t`` after ``context`` clean frames."""
    device = next(dit.parameters()).device
    x0 = batch["frames"].to(device).float() * 2 - 1
    eps = torch.randn(x0.shape, generator=generator).to(device)
    tt = torch.full(x0.shape[:2], float(t), device=device)
    tt[:, :context] = 0.0
    cond = ({"intrinsics": batch["intrinsics"].to(device).float(), "extrinsics": batch["extrinsics"].to(device).float()}
            if getattr(dit.cfg, "camera", "none") != "none" else {})
    _, feats = dit(add_noise(x0, tt, eps), tt, **cond, return_features=(block,))
    return feats[block].float().cpu()


def token_targets(batch: Mapping[str, torch.Tensor], grid: int, temporal_patch: int = 1) -> torch.Tensor:
    """``[B, T', grid, grid, 4]``: per token, (X / SCENE_SCALE, log depth) averaged over its cell and frames."""
    y = geometry_features(batch["depth"], batch["intrinsics"], batch["extrinsics"], 0, grid)
    if temporal_patch > 1:
        y = y.unflatten(1, (-1, temporal_patch)).mean(2)
    return y


def probe_rows(dit: torch.nn.Module, batch: Mapping[str, torch.Tensor], t: float, block: int, seed: int,
               context: int = 1, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features [N, D], targets [N, 4], clip [N])`` of every probed token of ``batch``, in chunks of ``chunk``
    clips; the noise of clip i is the same for every ``t`` (drawn from ``seed`` in clip order)."""
    tp = getattr(dit.cfg, "temporal_patch_size", 1)
    skip = context_token_frames(context, tp)
    g = torch.Generator().manual_seed(seed)
    feats, targets, clips = [], [], []
    n = batch["frames"].shape[0]
    for start in range(0, n, chunk):
        part = {k: v[start:start + chunk] for k, v in batch.items() if torch.is_tensor(v)}
        f = token_features(dit, part, t, block, g, context)
        if f.shape[2] != f.shape[3]:
            raise ValueError(f"probe: square token grids only, got {tuple(f.shape[2:4])}")
        y = token_targets(part, f.shape[2], tp)
        if y.shape[:4] != f.shape[:4]:
            raise ValueError(f"probe: targets {tuple(y.shape[:4])} vs features {tuple(f.shape[:4])}")
        f, y = f[:, skip:], y[:, skip:]
        feats.append(f.reshape(-1, f.shape[-1]))
        targets.append(y.reshape(-1, y.shape[-1]))
        clips.append(torch.arange(start, start + f.shape[0]).repeat_interleave(f[0].numel() // f.shape[-1]))
    return torch.cat(feats), torch.cat(targets), torch.cat(clips)


def summarise(r2: torch.Tensor) -> dict[str, float]:
    """``{x, y, z, depth, world}`` from the per-target R^2 ``[4]`` (world: the mean of x, y, z)."""
    out = {name: float(v) for name, v in zip(TARGETS, r2)}
    out["world"] = float(r2[:3].mean())
    return out


def probe_geometry(dit: torch.nn.Module, train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor],
                   block: int, times: Sequence[float] = (0.0, 0.5, 0.8), lam: float | None = None, seed: int = 0,
                   context: int = 1, chunk: int = 8) -> dict[str, dict[str, float]]:
    """Per flow time ``t`` (key ``f"{t:g}"``): the held-out R^2 of ridge probes fitted on ``train``'s tokens
    (:func:`summarise` plus the ``lambda`` used). ``train`` / ``test``: batches of clips with ``frames``, ``depth``,
    ``intrinsics``, ``extrinsics``. ``dit`` in eval mode."""
    out = {}
    for t in times:
        x_tr, y_tr, clips = probe_rows(dit, train, t, block, seed, context, chunk)
        x_te, y_te, _ = probe_rows(dit, test, t, block, seed + 1, context, chunk)
        r2, chosen = fit_and_score(x_tr, y_tr, x_te, y_te, lam, clips)
        out[f"{t:g}"] = {**summarise(r2), "lambda": chosen}
    return out


__all__ = ["Ridge", "TARGETS", "LAMBDA_GRID", "fit_ridge", "r2_score", "choose_lambda", "fit_and_score",
           "standardisation", "augment", "token_features", "token_targets", "probe_rows", "summarise",
           "probe_geometry", "context_token_frames"]
