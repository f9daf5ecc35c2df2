"""The one sampling API: sampling the flow-matching video DiT: per-frame noise levels, history guidance, long videos.

Path (``engine.objectives.flow_matching``): ``x_t = (1 - t) x0 + t eps`` with a flow time t per frame
(t = 0 clean, t = 1 noise); the model predicts the velocity ``v = eps - x0``. Videos live in [-1, 1].

**Windows.** The model sees a window of frames, each with a *kind*:

- ``GENERATE`` (0): denoised from t = 1 to t = 0 by the scheduling matrix;
- ``CONTEXT`` (1): ground-truth history, clean (t = 0);
- ``GENERATED_CONTEXT`` (2): history generated earlier (stabilized guidance treats it as slightly noisy);
- ``PAD`` (3): filler keeping a short window at the trained length (pure noise at t = 1, its camera
  the last real frame's; never updated nor returned), as DFoT pads with fully-noised tokens.

**Steps** (one row of the scheduling matrix to the next, per frame; frames whose t does not change are
left alone): ``euler`` ``x' = x + (t' - t) v``; ``ddim`` predicts ``x0 = x - t v`` and
``eps = x + (1 - t) v`` and moves to ``x' = (1 - t') x0 + sqrt(t'^2 - c^2) eps + c z`` with
``c = eta * t' * sqrt(1 - ((1 - t) t' / ((1 - t') t))^2)`` (DDIM's posterior standard deviation for
this path, scaled by eta). With eta = 0 DDIM is algebraically the Euler step (the path is linear).
Scheduling matrices: ``full_sequence`` (every generated frame at the same t) or ``pyramid`` (frame j
starts j rows later, as Diffusion Forcing's autoregressive schedule). The time grid is
``shift * u / (1 + (shift - 1) u)`` of ``u = linspace(1, 0, steps + 1)``, or the explicit grid
``SamplerConfig.times`` (e.g. DFoT's DDIM levels as flow times, ``engine.objectives.dfot_velocity``).

**Models.** The sampler calls a velocity model ``model(x_t, t [B, T], **cond, drop_cond=)``: the DiT
(through ``engine.objectives.prediction.velocity_model``) or DFoT's v-prediction U-ViT3D through the
adapter ``engine.objectives.dfot_velocity.DFoTVelocity`` (which samples in DFoT's normalised pixel
space: callers map context frames in and samples out with its ``encode`` / ``decode``).

**Guidance** (DFoT's ``history_guidance.py``, :class:`Guidance`). The guided velocity is a weighted
sum of model evaluations, batched into one call. Each evaluation gives every history frame a *level*
k (it is fed as ``(1 - k) clean + k eps`` at flow time k, with an eps drawn for that evaluation
alone, as DFoT draws a separate noise per branch: :func:`engine.sampling.window.history_noise`) and
keeps or drops the cameras / actions. Levels here are flow times; ``engine.eval`` takes them from the user
in DFoT's units (``engine.eval.protocols.GuidanceSpec``). With ``u`` = every history frame at k = 1 and,
with ``guide_cond`` (DFoT's ``use_external_cond_guidance``), no cameras / actions either, and
``v_c`` = the full history (ground truth clean; generated history, kind 2, at k = s with
stabilization s > 0, else clean) with cond, the composition is ``u + sum_i w_i (v_i - u)``:

- conditional: ``v_c``;
- vanilla (HG-v): ``u + w (v_c - u)``;
- fractional (HG-f): ``v_c + (w - 1) (v_f - u)``, ``v_f``: every history frame (generated too) at
  k = ``fraction`` (DFoT's ``freq_scale``), cond kept;
- temporal (HG-t): ``u + sum_i w_i (v_i - u)`` over ``subsets`` / ``subset_weights``, ``v_i``: the
  history frames at positions ``subsets[i]`` (counted among the window's history frames, negative
  allowed; one out of range raises when a window is sampled) as in ``v_c``, the others at k = 1,
  cond kept (DFoT's ``gen_segments`` option is not supported);
- ``cond_scale`` s_c != 1: classifier-free guidance on cameras / actions with the history kept,
  ``+ (s_c - 1) (v_c - v(full history, no cond))`` (``drop_cond`` of the DiT).

Coinciding evaluations (e.g. with no history in the window) are merged. Scheme names
(:data:`GUIDANCE_NAMES`, :meth:`Guidance.named`): a history mode, optionally ``stabilized_``.

**Long videos.** :func:`predict_sequence` rolls a window autoregressively (DFoT ``_predict_sequence``):
each window keeps the last ``sliding_context`` frames as history and generates as many new frames as
fit. With ``keyframe_density < 1`` :func:`generate` first predicts the keyframes
``round(linspace(0, N - 1, round(density N)))`` (plus the context frames) autoregressively, then fills
the gaps with :func:`interpolate` (DFoT's interpolation plan), each with its own guidance.

Every function is batched over videos, runs under ``torch.no_grad`` with the model in eval mode
(restored afterwards), runs under the process precision's autocast (``autocast="auto"``: ``engine.precision``), shows a tqdm bar, and is
deterministic under a ``torch.Generator``: all noise is drawn from it, on its device.
"""
from geoforge.engine.sampling.common import eval_mode
from geoforge.engine.sampling.config import (AUTOCAST, COND_KEYS, CONTEXT, FRAME_KINDS, GENERATE, GENERATED_CONTEXT,
                                    GUIDANCE_NAMES, HISTORY_GUIDANCE, METHODS, PAD, SCHEDULES, Guidance, Model,
                                    SamplerConfig)
from geoforge.engine.sampling.long_video import (Window, count_model_steps, generate, interpolate, interpolation_plan,
                                        keyframe_indices, predict_sequence, sliding_windows)
from geoforge.engine.sampling.steps import flow_step, scheduling_matrix, time_grid
from geoforge.engine.sampling.window import guided_velocity, sample_clip, sample_window

__all__ = ["AUTOCAST", "COND_KEYS", "CONTEXT", "FRAME_KINDS", "GENERATE", "GENERATED_CONTEXT", "GUIDANCE_NAMES",
           "HISTORY_GUIDANCE", "METHODS", "PAD", "SCHEDULES", "Guidance", "Model", "SamplerConfig", "Window",
           "count_model_steps", "eval_mode", "flow_step", "generate", "guided_velocity", "interpolate",
           "interpolation_plan", "keyframe_indices", "predict_sequence", "sample_clip", "sample_window",
           "scheduling_matrix", "sliding_windows", "time_grid"]
