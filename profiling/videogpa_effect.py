"""VideoGPA's effect on a trained small model: DPO with LoRA on oracle 3D-consistency pairs, then the base and the
DPO policy compared on held-out contexts, over several seeds.

    python profiling/videogpa_effect.py --policy-run runs/gf_small-<time>            # 300 contexts, K 4, seeds 0 1 2
    python profiling/videogpa_effect.py --policy-run RUN --contexts 64 --heldout 16 --seeds 0 1 --candidates 2

The policy is the run's latest checkpoint (EMA weights when it has them), e.g. of ``recipes/gf_small.yaml`` or
``dfot_small.yaml``; the recipe is ``--recipe`` (``videogpa_small``) with the policy run's ``model``,
``objective`` and ``data`` sections, so its checkpoint loads and its training scenes are the contexts. Scores
are ``videogpa.score.kind: oracle``: the 3D-consistency (reprojection) error of a video computed with the scene's
true depth and the cameras it was generated along (lower is better). For each seed s:

1. ``OUT/train_s<s>``: the VideoGPA pipeline (``engine/train.py``, a subprocess; recipe seed s, candidate seeds
   from s): K candidates for each of the first N training contexts -> oracle scores -> one pair per context
   (lowest vs highest error) -> Diffusion-DPO of LoRA adapters against the frozen base -> ``final/`` (adapter).
2. ``OUT/heldout_s<s>/base``: the generate, score and pairs stages on M held-out contexts (scenes no run trained
   on: ``engine.eval.run_report.heldout_recipe``'s split, the one ``engine.eval`` reads) with the base policy,
   candidate seeds from 1000 + s.
3. ``OUT/heldout_s<s>/dpo``: the generate and score stages on the same contexts with the same candidate seeds,
   the DPO adapter loaded: every DPO sample has a base sample of the same context and noise.

Per seed and policy: the mean oracle error of the held-out samples, their PSNR against the ground truth (the
frames after the context frame), and for the DPO policy the implicit reward accuracy on the held-out pairs of
step 2 (the fraction of pair x noise draws where ``-beta [(e_w - e_l) - (e_ref,w - e_ref,l)] > 0``, i.e. the
trained policy's implicit reward ranks the lower-error candidate higher; fp32; chance is 0.5), beside the
train stage's accuracy on training pairs before and after DPO. Reference rows: the ground truth's own oracle error
(the floor) and the repeated context frame (a static video: the trivial baseline of PSNR).

Writes ``OUT/results.json`` (every number), ``OUT/table.md`` (mean ± sample standard deviation over seeds, the
per-seed paired differences DPO - base, and whether the PSNR change stays within the seed spread) and
``OUT/videogpa_effect.png``. Finished stages are reused (each stage's completion marker; the held-out accuracy
in ``heldout_s<s>/implicit.json``). The plan, with a cost estimated from forwards timed on this machine, is
printed first.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from geoforge.engine.atomic import atomic_write_text  # noqa: E402
from geoforge.engine.checkpoint import latest_checkpoint  # noqa: E402
from geoforge.engine.config import Recipe, load_recipe, recipe_to_yaml  # noqa: E402
from geoforge.engine.distributed import World, resolve_device  # noqa: E402
from geoforge.engine.videogpa.io import read_jsonl, read_marker  # noqa: E402
from geoforge.engine.videogpa.pipeline import stage_complete  # noqa: E402
from profiling._experiment import launch  # noqa: E402

HELDOUT_SEED_OFFSET = 1000   # candidate seeds of the held-out generations: 1000 + s (training: s)
METRICS = [("consistency", "held-out 3D-consistency error (oracle MSE x1e3)", "lower"),
           ("psnr", "held-out PSNR vs ground truth (dB)", "higher")]


# ------------------------------------------------------------------------------------------- recipes
def policy_source(run: Path) -> tuple[Recipe, Path]:
    """The policy run's recipe and its latest complete checkpoint (exits naming what is missing)."""
    if not (run / "recipe.yaml").is_file():
        raise SystemExit(f"--policy-run {run}: no recipe.yaml (give a run directory of engine/train.py, e.g. of "
                         f"recipes/gf_small.yaml)")
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise SystemExit(f"--policy-run {run}: no complete checkpoint in {run / 'checkpoints'}")
    recipe = load_recipe(str(run / "recipe.yaml"))
    if recipe.model.arch != "dit":
        raise SystemExit(f"--policy-run {run}: a {recipe.model.arch} model; the VideoGPA policy here is the DiT")
    return recipe, checkpoint


def absolute_root(data):
    root = Path(data.root)
    return replace(data, root=str(root if root.is_absolute() else ROOT / root))


def train_recipe(base: Recipe, policy: Recipe, checkpoint: Path, seed: int, args) -> Recipe:
    """The DPO run of seed ``seed``: ``base`` with the policy's model, objective and data (its training scenes are
    the contexts), the policy checkpoint, N contexts, K candidates (seeds from ``seed``), the oracle scorer."""
    vg = base.videogpa
    gen = replace(vg.generate, candidates=args.candidates, seed=seed,
                  steps=args.sample_steps or vg.generate.steps)
    vg = replace(vg, stages=["generate", "score", "pairs", "train"],
                 policy=replace(vg.policy, kind="dit", checkpoint=str(checkpoint), adapter=""),
                 inputs=replace(vg.inputs, kind="dataset", count=args.contexts), generate=gen,
                 score=replace(vg.score, kind="oracle"))
    data = replace(absolute_root(policy.data), batch_size=base.data.batch_size, hflip_prob=0.0,
                   num_workers=base.data.num_workers,
                   synthetic_seed=policy.data.scene_seed(policy.seed))   # the policy's scenes for every seed
    schedule = replace(base.schedule, steps=args.dpo_steps or base.schedule.steps)
    schedule = replace(schedule, warmup=min(schedule.warmup, schedule.steps))
    return replace(base, seed=seed, model=policy.model, objective=policy.objective, data=data, schedule=schedule,
                   videogpa=vg)


def heldout_recipes(trained: Recipe, policy: Recipe, seed: int, args, adapter: Path) -> dict[str, Recipe]:
    """The held-out generations of seed ``seed``: ``base`` (generate, score, pairs) and ``dpo`` (generate, score
    with ``adapter``), on the same M held-out contexts (fixed over seeds) with the same candidate seeds."""
    from geoforge.engine.eval.run_report import heldout_recipe

    held = heldout_recipe(policy, args.heldout)
    if held is None:
        raise SystemExit(f"the policy's data {policy.data.root} has no held-out split (synthetic data, or a test/ "
                         f"split with depth)")
    vg = trained.videogpa
    gen = replace(vg.generate, seed=HELDOUT_SEED_OFFSET + seed)
    common = replace(trained, seed=held.seed, data=replace(absolute_root(held.data), hflip_prob=0.0))
    base = replace(common, videogpa=replace(vg, stages=["generate", "score", "pairs"], generate=gen,
                                            inputs=replace(vg.inputs, count=args.heldout)))
    dpo = replace(base, videogpa=replace(base.videogpa, stages=["generate", "score"],
                                         policy=replace(vg.policy, adapter=str(adapter))))
    return {"base": base, "dpo": dpo}


def write_recipe(recipe: Recipe, path: Path, overrides: list[str]) -> Recipe:
    """Write ``recipe`` as YAML to ``path`` and read it back with ``overrides`` (typed, validated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, recipe_to_yaml(recipe))
    return load_recipe(str(path), overrides)


# ---------------------------------------------------------------------------------------------- runs
def run_train(recipe_path: Path, run_dir: Path, overrides: list[str]) -> bool:
    """``engine/train.py`` on the DPO run unless its ``final/COMPLETE`` exists; output in ``RUN_DIR.log``.
    Returns True when it ran."""
    if stage_complete(run_dir, "train"):
        print(f"reusing {run_dir}", flush=True)
        return False
    launch(str(recipe_path), run_dir, overrides, what="the DPO run")
    return True


def world_for(recipe: Recipe) -> World:
    return World(rank=0, local_rank=0, size=1, local_size=1, device=resolve_device(recipe.device))


def run_stages(recipe: Recipe, run_dir: Path, show_progress: bool) -> None:
    """The recipe's pending VideoGPA stages in this process, in the recipe's precision (as engine/train.py)."""
    from geoforge.engine.precision import resolve_precision, use_precision
    from geoforge.engine.videogpa.pipeline import run_pipeline

    if all(stage_complete(run_dir, s) for s in recipe.videogpa.stages):
        print(f"reusing {run_dir}", flush=True)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    world = world_for(recipe)
    with use_precision(resolve_precision(recipe.distributed.precision, world.device)):
        print(run_pipeline(recipe, run_dir, world, show_progress=show_progress)["text"], flush=True)


# ------------------------------------------------------------------------------------------ measures
def sample_metrics(recipe: Recipe, run_dir: Path) -> dict[str, float]:
    """Of a held-out generation: the mean oracle error of its candidates (``scores.jsonl``) and their mean PSNR
    against the ground truth over the frames after the context frame (each candidate's mean over frames)."""
    from geoforge.engine.data.video_io import decode_video
    from geoforge.engine.eval.image_metrics import psnr
    from geoforge.engine.videogpa.score import InputGeometry

    rows = read_jsonl(run_dir / "scores.jsonl")
    truth = InputGeometry(recipe, run_dir)
    values = []
    for row in rows:
        meta = json.loads((run_dir / "candidates" / row["input"] / "meta.json").read_text())
        gt = truth.dataset(int(meta["frames"]))[int(meta["index"])]["frames"]
        video = torch.from_numpy(decode_video(run_dir / row["video"])).permute(0, 3, 1, 2).float() / 255.0
        values.append(float(psnr(video[1:], gt[1:]).mean()))
    return {"consistency": 1e3 * float(np.mean([r["score"] for r in rows])), "psnr": float(np.mean(values)),
            "videos": len(rows)}


def reference_metrics(recipe: Recipe, run_dir: Path) -> dict[str, float]:
    """The ground truth's own oracle error (the floor) and the repeated context frame's error and PSNR, on the
    held-out contexts of ``run_dir`` (uint8 frames, as the candidates are stored)."""
    from geoforge.engine.eval.image_metrics import psnr
    from geoforge.engine.videogpa.policy_base import to_uint8
    from geoforge.engine.videogpa.score import InputGeometry, OracleScorer

    truth = InputGeometry(recipe, run_dir)
    cfg = recipe.videogpa.score
    scorer = OracleScorer(truth, None, cfg.frames, cfg.conf_threshold, 0.0, cfg.rotation_weight, recipe.backend)
    gt_err, rep_err, rep_psnr = [], [], []
    for key in read_marker(run_dir / "candidates" / "COMPLETE")["inputs"]:
        meta = json.loads((run_dir / "candidates" / key / "meta.json").read_text())
        clip = truth.dataset(int(meta["frames"]))[int(meta["index"])]["frames"]
        clip = torch.from_numpy(to_uint8(clip[None])[0]).permute(0, 3, 1, 2).float() / 255.0
        repeated = clip[:1].expand_as(clip)
        geometry = truth({"input": key})
        gt_err.append(scorer.score_clip(clip, geometry)["score"])
        rep_err.append(scorer.score_clip(repeated, geometry)["score"])
        rep_psnr.append(float(psnr(repeated[1:], clip[1:]).mean()))
    return {"consistency_gt": 1e3 * float(np.mean(gt_err)), "consistency_repeated": 1e3 * float(np.mean(rep_err)),
            "psnr_repeated": float(np.mean(rep_psnr))}


def heldout_implicit_accuracy(recipe: Recipe, pairs_dir: Path, draws: int) -> dict[str, float]:
    """Implicit reward accuracy and mean reward margin of the DPO policy (``recipe``: the policy with the DPO
    adapter) on every pair of ``pairs_dir/pairs.jsonl``, ``draws`` fixed noise draws each, in fp32 (the
    train stage's measurement, ``engine.videogpa.train_dpo.implicit_accuracy``)."""
    from geoforge.engine.precision import resolve_precision, use_precision
    from geoforge.engine.videogpa.policy import build_policy
    from geoforge.engine.videogpa.train_dpo import PairSet, build_dpo_module, implicit_accuracy

    pairs = read_jsonl(pairs_dir / "pairs.jsonl")
    world = world_for(recipe)
    with use_precision(resolve_precision("fp32", world.device)):
        policy = build_policy(recipe, world.device)
        module = build_dpo_module(recipe, policy)
        dataset = PairSet(pairs_dir, pairs, policy.frames, cached=False)
        parts = implicit_accuracy(module, policy, dataset, list(range(len(pairs))), draws, recipe.seed, cached=False)
    count = parts["count"] or 1.0
    return {"implicit_acc": parts["correct"] / count, "reward_margin": parts["margin"] / count,
            "pairs": len(pairs), "draws": draws}


def measure_seed(out: Path, seed: int, recipes: dict[str, Recipe], draws: int) -> dict:
    """Every number of seed ``seed`` from its finished runs (the held-out accuracy cached in implicit.json)."""
    train_dir, held = out / f"train_s{seed}", out / f"heldout_s{seed}"
    final = read_marker(train_dir / "final" / "COMPLETE")
    pairs = json.loads((train_dir / "pairs_summary.json").read_text())
    acc_file = held / "implicit.json"
    acc = read_marker(acc_file)
    if acc is None or acc.get("draws") != draws:
        acc = heldout_implicit_accuracy(recipes["dpo"], held / "base", draws)
        atomic_write_text(acc_file, json.dumps(acc, indent=1) + "\n")
    result = {
        "base": sample_metrics(recipes["base"], held / "base"),
        "dpo": sample_metrics(recipes["dpo"], held / "dpo"),
        "reference": reference_metrics(recipes["base"], held / "base"),
        "heldout_implicit_acc": acc["implicit_acc"], "heldout_reward_margin": acc["reward_margin"],
        "heldout_pairs": acc["pairs"],
        "train_implicit_acc_before": final["implicit_acc_before"], "train_implicit_acc_after": final["implicit_acc_after"],
        "train_pairs": final["train_pairs"], "dpo_steps": final["steps"],
        "train_winner_error": 1e3 * pairs.get("winner_score_mean", math.nan),
        "train_loser_error": 1e3 * pairs.get("loser_score_mean", math.nan),
    }
    return result


# ---------------------------------------------------------------------------------------- statistics
def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def paired(base: list[float], dpo: list[float], better: str) -> dict:
    """Base and DPO over seeds (index i: seed i of both): means, sample standard deviations, the per-seed
    differences DPO - base with their mean and standard deviation, the seed spread (the larger of the two
    policies' standard deviations over seeds), the seeds where DPO is better, whether the mean change is beyond
    the seed spread (|mean difference| > spread; None with one seed) and whether DPO is worse beyond it."""
    if len(base) != len(dpo) or not base:
        raise ValueError(f"paired: need the same non-zero number of seeds, got {len(base)} and {len(dpo)}")
    if better not in ("lower", "higher"):
        raise ValueError(f"paired: better must be 'lower' or 'higher', got {better!r}")
    diffs = [d - b for b, d in zip(base, dpo)]
    base_mean, base_sd = mean_sd(base)
    dpo_mean, dpo_sd = mean_sd(dpo)
    diff_mean, diff_sd = mean_sd(diffs)
    spread = max(base_sd, dpo_sd) if len(base) > 1 else math.nan
    gain = -diff_mean if better == "lower" else diff_mean   # > 0: DPO better on average
    known = not math.isnan(spread)
    return {"base_mean": base_mean, "base_sd": base_sd, "dpo_mean": dpo_mean, "dpo_sd": dpo_sd, "diffs": diffs,
            "diff_mean": diff_mean, "diff_sd": diff_sd, "spread": spread,
            "dpo_better_seeds": sum(1 for d in diffs if (d < 0 if better == "lower" else d > 0)),
            "beyond_spread": bool(abs(diff_mean) > spread) if known else None,
            "worse_beyond_spread": bool(-gain > spread) if known else None}


def summarise(results: dict[str, dict], seeds: list[int]) -> dict:
    """The statistics of :func:`paired` for each metric, and the held-out implicit accuracy over seeds."""
    runs = [results[f"s{s}"] for s in seeds]
    out = {key: paired([r["base"][key] for r in runs], [r["dpo"][key] for r in runs], better)
           for key, _, better in METRICS}
    acc = [r["heldout_implicit_acc"] for r in runs]
    acc_mean, acc_sd = mean_sd(acc)
    out["heldout_implicit_acc"] = {"values": acc, "mean": acc_mean, "sd": acc_sd,
                                   "above_chance_seeds": sum(1 for a in acc if a > 0.5)}
    return out


def fmt(mean: float, sd: float, digits: int = 4) -> str:
    return f"{mean:.{digits}g} ± {sd:.2g}" if not math.isnan(sd) else f"{mean:.{digits}g}"


def verdicts(summary: dict, n: int) -> list[str]:
    """One sentence per question of the experiment, from :func:`summarise`'s numbers."""
    c, p, a = summary["consistency"], summary["psnr"], summary["heldout_implicit_acc"]
    spread = {True: f"beyond the seed spread {c['spread']:.2g}", False: f"within the seed spread {c['spread']:.2g}",
              None: "one seed: no spread"}
    lines = [f"- 3D consistency: the DPO policy's held-out error is lower on {c['dpo_better_seeds']}/{n} seeds; mean "
             f"change {fmt(c['diff_mean'], c['diff_sd'], 3)} x1e3 ({spread[c['beyond_spread']]}).",
             f"- PSNR: mean change {p['diff_mean']:+.3g} dB, "
             + ({True: f"a fall beyond the seed spread {p['spread']:.2g} dB.",
                 False: f"not a fall beyond the seed spread {p['spread']:.2g} dB.",
                 None: "one seed: no spread."}[p["worse_beyond_spread"]]),
             f"- Implicit reward accuracy on held-out pairs: {fmt(a['mean'], a['sd'], 3)} (chance 0.5), above 0.5 on "
             f"{a['above_chance_seeds']}/{n} seeds."]
    return lines


def table(results: dict[str, dict], seeds: list[int], summary: dict) -> str:
    runs = [results[f"s{s}"] for s in seeds]
    lines = ["| metric | better | base | DPO | DPO - base per seed (mean ± sd) | DPO better | beyond the seed spread |",
             "|---|---|---|---|---|---|---|"]
    for key, name, better in METRICS:
        st = summary[key]
        diffs = ", ".join(f"{d:+.3g}" for d in st["diffs"])
        beyond = {True: f"yes ({st['spread']:.2g})", False: f"no ({st['spread']:.2g})", None: "n/a (one seed)"}
        lines.append(f"| {name} | {better} | {fmt(st['base_mean'], st['base_sd'])} | "
                     f"{fmt(st['dpo_mean'], st['dpo_sd'])} | {diffs} ({fmt(st['diff_mean'], st['diff_sd'], 3)}) | "
                     f"{st['dpo_better_seeds']}/{len(seeds)} | {beyond[st['beyond_spread']]} |")
    acc = summary["heldout_implicit_acc"]
    lines.append(f"| implicit reward accuracy, held-out pairs (chance 0.5) | higher | | {fmt(acc['mean'], acc['sd'], 3)}"
                 f" | {', '.join(f'{a:.3f}' for a in acc['values'])} | {acc['above_chance_seeds']}/{len(seeds)} "
                 f"above 0.5 | |")
    after = mean_sd([r["train_implicit_acc_after"] for r in runs])
    lines.append(f"| implicit reward accuracy, training pairs (after DPO) | higher | | {fmt(*after, 3)} | | | |")
    lines += ["", *verdicts(summary, len(seeds)), "",
              "Reference rows (the held-out contexts' ground truth; the same for every seed):", "",
              "| | 3D-consistency error (x1e3) | PSNR (dB) |", "|---|---|---|"]
    ref = runs[0]["reference"]
    lines.append(f"| ground truth (the floor) | {ref['consistency_gt']:.4g} | inf |")
    lines.append(f"| repeated context frame (static) | {ref['consistency_repeated']:.4g} | {ref['psnr_repeated']:.4g} |")
    winner = mean_sd([r["train_winner_error"] for r in runs])
    loser = mean_sd([r["train_loser_error"] for r in runs])
    lines += ["", f"Training pairs: winner error {fmt(*winner)} x1e3, loser {fmt(*loser)} x1e3 (mean over pairs, "
                  f"over seeds); {runs[0]['train_pairs']} pairs and {runs[0]['dpo_steps']} DPO steps per seed. "
                  f"Held-out: {runs[0]['base']['videos']} samples per policy and seed, {runs[0]['heldout_pairs']} "
                  f"pairs. Before DPO the policy is its reference, so every implicit reward is 0."]
    return "\n".join(lines)


def plot(results: dict[str, dict], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [results[f"s{s}"] for s in seeds]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    for ax, (key, name, better) in zip(axes, METRICS):
        for s, r in zip(seeds, runs):
            ax.plot([0, 1], [r["base"][key], r["dpo"][key]], "o-", lw=1, ms=4, label=f"seed {s}")
        ref_key, ref_name = (("consistency_gt", "ground truth") if key == "consistency"
                             else ("psnr_repeated", "repeated context"))
        ax.axhline(statistics.mean(r["reference"][ref_key] for r in runs), color="grey", ls="--", lw=1,
                   label=ref_name)
        ax.set_xticks([0, 1], ["base", "DPO"])
        ax.set_xlim(-0.3, 1.3)
        ax.set_title(f"{name}\n({better} is better)", fontsize=8)
        ax.legend(fontsize=6)
    ax = axes[2]
    x = np.arange(len(seeds))
    ax.bar(x - 0.2, [r["train_implicit_acc_after"] for r in runs], 0.4, label="training pairs")
    ax.bar(x + 0.2, [r["heldout_implicit_acc"] for r in runs], 0.4, label="held-out pairs")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(x, [f"seed {s}" for s in seeds])
    ax.set_ylim(0, 1)
    ax.set_title("implicit reward accuracy of the DPO policy\n(chance 0.5)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- cost
def time_forward(recipe: Recipe, batch: int, repeats: int = 2) -> float:
    """Seconds of one forward of the policy network on ``batch`` clips (fresh DiT of the recipe's model, the
    recipe's precision, no gradient)."""
    from geoforge.engine.models.dit import VideoDiT
    from geoforge.engine.precision import autocast, resolve_precision, use_precision

    device = resolve_device(recipe.device)
    with use_precision(resolve_precision(recipe.distributed.precision, device)):
        dit = VideoDiT(recipe.model).to(device).eval()
        r, f = recipe.data.resolution, recipe.data.frames
        x = torch.randn(batch, f, 3, r, r, device=device)
        t = torch.rand(batch, f, device=device)
        kwargs = {}
        if recipe.model.camera != "none":
            kwargs = {"intrinsics": torch.eye(3, device=device).expand(batch, f, 3, 3) * r,
                      "extrinsics": torch.eye(3, 4, device=device).expand(batch, f, 3, 4)}
        seconds = []
        with torch.no_grad(), autocast(device):
            for i in range(repeats + 1):
                began = time.perf_counter()
                dit(x, t, **kwargs)
                if i:
                    seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


STARTUP_SECONDS = 25.0   # a DPO subprocess: imports, DeepSpeed start, checkpoints (measured ~15-30 s here)


def plan_cost(trained: Recipe, args, candidates: float, pairs_batch: float, done: dict[str, bool]
              ) -> list[tuple[str, float]]:
    """Estimated seconds of each stage of one seed from the timed forwards (``candidates``: the K candidates of an
    input, sampled in one batch - a sampler step; ``pairs_batch``: the 2B clips of a DPO micro-batch); finished
    stages cost 0. The model: a sampler step = one forward of K clips; a DPO step = 3 forwards with gradient + 1 reference forward; an implicit-accuracy batch = 2
    forwards; scoring a video (decode + reprojection at 32x32) ~ 0.03 s."""
    vg, steps = trained.videogpa, trained.videogpa.generate.steps
    k, n, m = vg.generate.candidates, vg.inputs.count, args.heldout
    eval_batches = 2 * math.ceil(min(vg.dpo.eval_pairs, n) / 4) * vg.dpo.eval_draws
    items = [
        ("train: generate", n * steps * candidates, "train_generate"),
        ("train: score", n * k * 0.03, "train_score"),
        ("train: DPO", STARTUP_SECONDS + trained.schedule.steps * 4 * pairs_batch + eval_batches * 2 * pairs_batch,
         "train_train"),
        ("held-out: base generate + score", m * (steps * candidates + k * 0.03), "heldout_base"),
        ("held-out: DPO generate + score", m * (steps * candidates + k * 0.03), "heldout_dpo"),
        ("held-out: implicit accuracy", math.ceil(m / 4) * args.draws * 2 * pairs_batch, "implicit"),
    ]
    return [(name, 0.0 if done.get(key) else cost) for name, cost, key in items]


def progress(out: Path, seed: int, draws: int) -> dict[str, bool]:
    train_dir, held = out / f"train_s{seed}", out / f"heldout_s{seed}"
    acc = read_marker(held / "implicit.json")
    return {"train_generate": stage_complete(train_dir, "generate"), "train_score": stage_complete(train_dir, "score"),
            "train_train": stage_complete(train_dir, "train"),
            "heldout_base": stage_complete(held / "base", "pairs"), "heldout_dpo": stage_complete(held / "dpo", "score"),
            "implicit": acc is not None and acc.get("draws") == draws}


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy-run", required=True, type=Path, help="run directory of the trained policy (its "
                   "recipe.yaml and latest checkpoint), e.g. of recipes/gf_small.yaml or dfot_small.yaml")
    p.add_argument("--recipe", default="videogpa_small", help="the VideoGPA recipe the runs start from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--contexts", type=int, default=300, help="training contexts N (K candidates each)")
    p.add_argument("--candidates", type=int, default=4, help="candidates K per context")
    p.add_argument("--heldout", type=int, default=64, help="held-out contexts M")
    p.add_argument("--sample-steps", type=int, default=0, help="sampler steps (0: the recipe's)")
    p.add_argument("--dpo-steps", type=int, default=0, help="DPO optimizer steps (0: the recipe's)")
    p.add_argument("--draws", type=int, default=4, help="noise draws per held-out pair (implicit accuracy)")
    p.add_argument("--out", type=Path, default=Path("runs/videogpa_effect"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run (after the policy's sections are filled in)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plan", action="store_true", help="print the plan and its estimated cost (and write the runs' recipes), run nothing")
    args = p.parse_args(argv)
    for name in ("contexts", "heldout", "draws"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: must be >= 1")
    if args.candidates < 2:
        p.error("--candidates: a preference pair needs >= 2")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: repeated seed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (args.out if args.out.is_absolute() else ROOT / args.out).resolve()
    policy, checkpoint = policy_source(args.policy_run.resolve())
    base = load_recipe(args.recipe)
    if base.videogpa is None:
        raise SystemExit(f"--recipe {args.recipe}: not a VideoGPA recipe (no videogpa section)")

    recipes: dict[int, dict[str, Recipe]] = {}
    for seed in args.seeds:
        recipe_dir = out / "recipes"
        trained = write_recipe(train_recipe(base, policy, checkpoint, seed, args), recipe_dir / f"train_s{seed}.yaml",
                               args.set)
        held = heldout_recipes(trained, policy, seed, args, out / f"train_s{seed}" / "final")
        recipes[seed] = {"train": trained, **{k: write_recipe(r, recipe_dir / f"heldout_{k}_s{seed}.yaml", args.set)
                                              for k, r in held.items()}}

    trained = recipes[args.seeds[0]]["train"]
    done = {seed: progress(out, seed, args.draws) for seed in args.seeds}
    pending = not all(all(d.values()) for d in done.values())
    k = trained.videogpa.generate.candidates * (2 if trained.videogpa.generate.guidance != 1.0 else 1)
    candidates = time_forward(trained, k) if pending else 0.0
    pairs_batch = time_forward(trained, 2 * trained.data.batch_size) if pending else 0.0
    vg = trained.videogpa
    print(f"plan: policy {checkpoint} ({policy.name}); {len(args.seeds)} seeds {args.seeds} x [DPO run: {vg.inputs.count} "
          f"training contexts x K={vg.generate.candidates} candidates ({vg.generate.steps} sampler steps), oracle "
          f"scores, pairs, {trained.schedule.steps} DPO steps of {trained.data.batch_size} pairs (LoRA r "
          f"{vg.lora.rank}); held-out: {args.heldout} contexts x K for the base and the DPO policy, implicit accuracy "
          f"on their pairs x {args.draws} draws] -> {out}", flush=True)
    total = 0.0
    for seed in args.seeds:
        costs = plan_cost(recipes[seed]["train"], args, candidates, pairs_batch, done[seed])
        seconds = sum(c for _, c in costs)
        total += seconds
        print(f"  seed {seed}: " + ", ".join(f"{name} {c / 60:.1f} min" if c else f"{name} done" for name, c in costs),
              flush=True)
    print(f"estimated cost: {total / 60:.1f} min on this machine (a policy forward takes {1e3 * candidates:.1f} ms at "
          f"batch {k} (an input's candidates{', x2 for guidance' if k > trained.videogpa.generate.candidates else ''}), "
          f"{1e3 * pairs_batch:.1f} ms at batch {2 * trained.data.batch_size}, timed now under the current load); "
          f"finished stages are reused", flush=True)
    if args.plan:
        return 0

    results = {}
    for seed in args.seeds:
        r = recipes[seed]
        run_train(out / "recipes" / f"train_s{seed}.yaml", out / f"train_s{seed}", args.set)
        run_stages(r["base"], out / f"heldout_s{seed}" / "base", not args.no_progress)
        run_stages(r["dpo"], out / f"heldout_s{seed}" / "dpo", not args.no_progress)
        results[f"s{seed}"] = measure_seed(out, seed, r, args.draws)
        row = results[f"s{seed}"]
        print(f"seed {seed}: base {row['base']}, DPO {row['dpo']}, held-out implicit accuracy "
              f"{row['heldout_implicit_acc']:.3f}", flush=True)

    summary = summarise(results, args.seeds)
    info = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "policy_checkpoint": str(checkpoint), "seeds": args.seeds, "runs": results, "summary": summary}
    atomic_write_text(out / "results.json", json.dumps(info, indent=1) + "\n")
    text = (f"VideoGPA on {policy.name} ({checkpoint}): {vg.inputs.count} training contexts x K={vg.generate.candidates}, "
            f"oracle 3D-consistency pairs, DPO with LoRA; held-out: {args.heldout} contexts x K samples per policy; "
            f"seeds {args.seeds} (mean ± sample standard deviation over seeds)\n\n" + table(results, args.seeds, summary))
    atomic_write_text(out / "table.md", text + "\n")
    plot(results, args.seeds, out / "videogpa_effect.png")
    print(text)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'videogpa_effect.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
