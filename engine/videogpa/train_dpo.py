"""The ``train`` stage: Diffusion-DPO of the policy on the preference pairs, as a task of the one trainer
(``engine.trainer``: DeepSpeed, resume, checkpoints, the non-finite policy and logging are shared with
diffusion training).

Per micro-batch of training pairs: winner and loser latents get the *same* noise and timesteps (drawn per
pair from ``(seed, step, pair index)``, so any number of ranks sees the same noise), the policy network
and the reference give per-sample errors e (mean over F, C, H, W), and ``engine.objectives.dpo.dpo_loss``
turns them into the loss, the implicit accuracy and the reward margin. Winner and loser go through the
network in one batch of 2B.

Trained parameters: the LoRA adapters (peft; the reference is the same network with adapters disabled,
or a frozen copy if ``dpo.reference: frozen_copy``), or every weight when ``lora.enabled: false`` (the
reference is then a frozen copy). The recipe's ``optimizer``, ``schedule`` (steps, warmup, decay),
``distributed`` (ZeRO stage, bf16, grad accumulation, activation checkpointing) and ``logging`` sections apply;
``data.batch_size`` is the number of pairs per micro-batch and rank.

Sequence parallelism (``distributed.sequence_parallel: N``, DeepSpeed-Ulysses): the world forms world / N
data-parallel groups of N consecutive ranks; the ranks of a group read the same pairs (the sampler splits
the pairs over the groups) and each keeps 1 / N of every clip's tokens inside the policy network (the own
DiT: ``engine.models.sequence_parallel``; Wan / CogVideoX: ``engine.videogpa.diffusers_sp``), for the
policy and the reference forwards alike. The network's prediction is all-gathered, so the per-sample errors,
the DPO loss and the logged parts are the whole clip's on every rank of a group, and the gradients summed over
a group are N times the whole clip's (DeepSpeed's mean over N x DP ranks is the data-parallel mean). The
implicit-accuracy evaluation (``eval()`` mode) runs whole clips, its pairs split over all ranks.

Files (``<run>/train/``): ``metrics.jsonl`` and tensorboard events (DPO loss, implicit accuracy, reward
margin, errors, winner/loser mean scores, step time), ``checkpoints/step_N`` (DeepSpeed state without
the frozen weights, ``adapter/`` or ``model.safetensors``, RNG; atomic; a killed stage resumes from the newest). Output (``<run>/final/``,
atomic): the peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``) or ``model.safetensors``
for full fine-tuning, and ``COMPLETE`` (JSON summary: implicit accuracy on the training pairs before and
after, peak memory, parameter bytes, time).
"""
from __future__ import annotations

import copy
import logging
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from geoforge.engine.checkpoint import consolidated_state_dict, save_module_weights
from geoforge.engine.data.sampler import ResumableBatchSampler
from geoforge.engine.distributed import ParallelLayout, World, barrier, mean_over_ranks, parallel_layout
from geoforge.engine.models.sequence_parallel import SequenceParallel, set_sequence_parallel
from geoforge.engine.objectives.dpo import DPOModule
from geoforge.engine.objectives.video_loss import sample_seed
from geoforge.engine.trainer import MicroBatch, Task, Trainer
from geoforge.engine.videogpa.generate import load_condition
from geoforge.engine.atomic import atomic_save, publish_dir, temp_path
from geoforge.engine.videogpa.io import read_jsonl, read_marker, write_marker
from geoforge.engine.videogpa.lora import add_lora, frozen_copy, parameter_bytes, save_adapter
from geoforge.engine.videogpa.policy import VideoPolicy
from geoforge.engine.videogpa.policy_base import check_sequence_parallel

log = logging.getLogger("geoforge.videogpa")
PARTS = ("loss", "implicit_acc", "reward_margin", "err_w", "err_l", "ref_err_w", "ref_err_l")


# ----------------------------------------------------------------------------------------------- data
def latent_file(run_dir: Path, video: str) -> Path:
    return Path(run_dir) / "latents" / (video.replace("/", "__") + ".safetensors")


def decode_frames(path: Path, frames: int) -> Tensor:
    """A candidate video as float ``[T, 3, H, W]`` in [0, 1]; its length must be ``frames``."""
    from geoforge.engine.data.video_io import decode_video

    video = decode_video(path)
    if len(video) != frames:
        raise ValueError(f"{path}: {len(video)} frames, the policy makes {frames}")
    return torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255.0


def cache_latents(policy: VideoPolicy, run_dir: Path, videos: list[str], world) -> None:
    """Encode every video once into ``<run>/latents/`` (atomic per file; ranks split the work)."""
    for i, video in enumerate(videos):
        target = latent_file(run_dir, video)
        if i % world.size != world.rank or target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            x0 = policy.encode(decode_frames(Path(run_dir) / video, policy.frames)[None])[0]
        atomic_save(target, lambda tmp: save_file({"x0": x0.float().cpu().contiguous()}, str(tmp)))
    barrier()


class PairSet(torch.utils.data.Dataset):
    """Training pairs: ``winner``/``loser`` clean samples (cached latents, or decoded frames to encode),
    the input's :class:`Condition`, and the pair's scores."""

    def __init__(self, run_dir: Path, pairs: list[dict[str, Any]], frames: int, cached: bool):
        self.run_dir, self.pairs, self.frames, self.cached = Path(run_dir), pairs, frames, cached

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, video: str) -> Tensor:
        if self.cached:
            return load_file(str(latent_file(self.run_dir, video)))["x0"]
        return decode_frames(self.run_dir / video, self.frames)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        return {"index": index, "winner": self._load(pair["winner"]), "loser": self._load(pair["loser"]),
                "condition": load_condition(self.run_dir, pair["input"]),
                "winner_score": pair["winner_score"], "loser_score": pair["loser_score"]}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"index": torch.tensor([it["index"] for it in items]),
            "winner": torch.stack([it["winner"] for it in items]), "loser": torch.stack([it["loser"] for it in items]),
            "conditions": [it["condition"] for it in items],
            "winner_score": torch.tensor([it["winner_score"] for it in items], dtype=torch.float64),
            "loser_score": torch.tensor([it["loser_score"] for it in items], dtype=torch.float64)}


def pair_noise(policy: VideoPolicy, sample_shape: tuple[int, ...], indices: list[int], seed: int,
               step: int) -> dict[str, Tensor]:
    """Per-pair noise from ``(seed, step, pair index)``, stacked (CPU)."""
    parts = [policy.draw_noise((1, *sample_shape), torch.Generator().manual_seed(sample_seed(seed, step, i)))
             for i in indices]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def prepare_batch(policy: VideoPolicy, batch: dict[str, Any], cached: bool, seed: int, step: int
                  ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """(x_w, x_l, cond, noise) on the policy's device for a collated batch."""
    with torch.no_grad():
        if cached:
            x_w, x_l = batch["winner"].to(policy.device), batch["loser"].to(policy.device)
        else:
            x_w, x_l = policy.encode(batch["winner"]), policy.encode(batch["loser"])
        cond = policy.batch_condition(batch["conditions"])
    noise = pair_noise(policy, tuple(x_w.shape[1:]), batch["index"].tolist(), seed, step)
    return x_w, x_l, cond, noise


def eval_share(indices: list[int], rank: int, size: int, batch_size: int = 4) -> tuple[list[int], int]:
    """This rank's share of the evaluation pairs and the number of batches *every* rank runs: the same on all
    ranks, because under ZeRO-3 each forward gathers the partitioned parameters collectively, so a rank with
    fewer forwards would leave the others waiting (9 pairs on 2 ranks: 5 and 4 pairs, 2 batches each)."""
    per_rank = -(-len(indices) // size)
    return indices[rank::size], -(-per_rank // batch_size)


@torch.no_grad()
def implicit_accuracy(module: DPOModule, policy: VideoPolicy, dataset: PairSet, indices: list[int], draws: int,
                      seed: int, cached: bool, batch_size: int = 4, batches: int | None = None) -> dict[str, float]:
    """Implicit accuracy and mean reward margin of ``module`` on the pairs ``indices``, each with ``draws``
    fixed noise draws (independent of training steps). Returns sums and counts for cross-rank reduction.
    ``batches`` (:func:`eval_share`): forwards per draw; a batch past the end of ``indices`` runs pair 0 and
    counts nothing (it only keeps the ranks' collectives in step)."""
    batches = -(-len(indices) // batch_size) if batches is None else batches
    correct, margin, count = 0.0, 0.0, 0
    was_training = module.training
    module.eval()
    try:
        for draw in range(draws):
            for b in range(batches):
                chunk = indices[b * batch_size:(b + 1) * batch_size]
                batch = collate([dataset[i] for i in chunk or [0]])
                x_w, x_l, cond, noise = prepare_batch(policy, batch, cached, seed + 7_777_777, -1 - draw)
                e_w, e_l, r_w, r_l = module.errors(x_w, x_l, cond, noise)
                if not chunk:
                    continue
                logit = -module.beta * ((e_w - e_l) - (r_w - r_l))
                correct += float((logit > 0).sum())
                margin += float(logit.sum())
                count += len(logit)
    finally:
        module.train(was_training)
    return {"correct": correct, "margin": margin, "count": float(count)}


def _reduce_accuracy(parts: dict[str, float], world) -> dict[str, float]:
    total = mean_over_ranks(parts)
    count = total["count"] or 1.0
    return {"implicit_acc": total["correct"] / count, "reward_margin": total["margin"] / count,
            "pairs_evaluated": total["count"] * world.size}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_dpo_module(recipe, policy: VideoPolicy) -> DPOModule:
    """LoRA (or full fine-tuning) on ``policy.network`` and the reference the recipe asks for.

    With an adapter loaded from a file (``videogpa.policy.adapter``, ``policy.adapter``), training starts
    from it: with LoRA its adapters are what trains (the ``lora`` section's rank / alpha / targets are the
    file's, not the recipe's); without LoRA it is merged into the weights that train. Either way the
    reference is the base network without the adapter."""
    vg = recipe.videogpa
    torch.manual_seed(recipe.seed)
    if policy.adapter is not None:
        return _dpo_module_from_adapter(recipe, policy)
    base = policy.network
    reference = frozen_copy(base) if vg.reference_mode() == "frozen_copy" else None
    if vg.lora.enabled:
        network = add_lora(base, vg.lora, policy.default_lora_targets)
    else:
        network = base.requires_grad_(True)
    return DPOModule(network, reference, policy.per_sample_error, vg.dpo.beta)


def _dpo_module_from_adapter(recipe, policy: VideoPolicy) -> DPOModule:
    vg, loaded = recipe.videogpa, policy.adapter
    reference = None
    if vg.reference_mode() == "frozen_copy":
        reference = frozen_copy(copy.deepcopy(loaded.network).unload())   # the base without the adapter
    if vg.lora.enabled:
        network = loaded.network
        for name, p in network.named_parameters():
            p.requires_grad_(".lora_" in name)
        log.info(f"videogpa: DPO continues the adapter {loaded.files.source} (r {loaded.rank}, alpha "
                 f"{loaded.alpha:g} x scale {loaded.scale:g}, targets {loaded.targets}); videogpa.lora's rank / "
                 f"alpha / targets do not apply")
    else:
        network = loaded.network.merge_and_unload().requires_grad_(True)   # policy.network, merged in place
        policy.adapter = None
        log.info(f"videogpa: adapter {loaded.files.source} merged into the policy's weights (full fine-tuning)")
    return DPOModule(network, reference, policy.per_sample_error, vg.dpo.beta)


class DPOTask(Task):
    """Diffusion-DPO of the policy on the preference pairs, as a task of the one trainer."""

    def __init__(self, recipe, policy: VideoPolicy, dataset: PairSet, world: World,
                 layout: ParallelLayout | None = None):
        self.recipe, self.policy, self.dataset, self.world = recipe, policy, dataset, world
        # the ranks of a sequence-parallel group train on the same pairs: the sampler splits over DP groups
        self.data_parallel = (layout.dp_rank, layout.dp_size) if layout is not None else (world.rank, world.size)
        self.module = build_dpo_module(recipe, policy)
        self.lora = recipe.videogpa.lora.enabled

    def enable_activation_checkpointing(self) -> None:
        self.policy.enable_activation_checkpointing()

    def micro_batches(self, start: int) -> Iterator[list[int]]:
        r = self.recipe
        dp_rank, dp_size = self.data_parallel
        sampler = ResumableBatchSampler(len(self.dataset), r.data.batch_size, r.distributed.grad_accum,
                                        dp_size, dp_rank, seed=r.seed, start=start)
        return ([i for i, _ in batch] for batch in sampler)

    def prepare(self, indices: list[int], step: int, timer) -> MicroBatch:
        batch = collate([self.dataset[i] for i in indices])
        args = prepare_batch(self.policy, batch, self.dataset.cached, self.recipe.seed, step)
        timer.mark("data")
        return MicroBatch(args, metrics={"winner_score": float(batch["winner_score"].mean()),
                                         "loser_score": float(batch["loser_score"].mean())})

    def export(self, directory: Path, world: World, zero_stage: int) -> None:
        if self.lora:
            save_adapter(self.module.network, directory / "adapter", zero_stage, world.is_main)
        else:
            save_module_weights(directory, self.module.network, world, zero_stage)


def _save_final(run_dir: Path, module: DPOModule, policy: VideoPolicy, world, zero_stage: int, lora: bool,
                summary: dict[str, Any]) -> Path:
    final = Path(run_dir) / "final"
    tmp = temp_path(final, unique=False)
    if lora:
        save_adapter(module.network, tmp, zero_stage, world.is_main, getattr(policy, "diffusers_pipeline_class", None))
    else:
        weights = consolidated_state_dict(module.network, zero_stage)
        if world.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    if world.is_main:
        write_marker(tmp / "COMPLETE", summary)
        publish_dir(tmp, final)
    barrier()
    return final


def run_train_stage(recipe, run_dir: Path, world, policy: VideoPolicy, show_progress: bool = True) -> dict[str, Any]:
    """The ``train`` stage (see the module docstring). Returns the summary written to ``final/COMPLETE``."""
    run_dir = Path(run_dir)
    done = read_marker(run_dir / "final" / "COMPLETE")
    if done is not None:
        return {"skipped": True, **done}
    vg = recipe.videogpa
    pairs_file = run_dir / "pairs.jsonl"
    if not pairs_file.is_file():
        raise FileNotFoundError(f"{pairs_file} is missing: run the pairs stage first")
    pairs = [p for p in read_jsonl(pairs_file) if p["split"] == "train"]
    policy.drop_text_encoder()   # prompts are embedded in the stored conditions
    cached = vg.dpo.cache_latents
    if cached:
        cache_latents(policy, run_dir, sorted({p["winner"] for p in pairs} | {p["loser"] for p in pairs}), world)
    dataset = PairSet(run_dir, pairs, policy.frames, cached)
    layout = parallel_layout(world, recipe.distributed.sequence_parallel)   # DP x SP (Ulysses) groups
    check_sequence_parallel(policy, layout.sp_size)
    if layout.sp_size > 1:
        policy.enable_sequence_parallel()   # before the reference copy: both networks split their tokens
        set_sequence_parallel(SequenceParallel(layout.sp_group, layout.sp_size, layout.sp_rank))
    try:
        return _train(recipe, run_dir, world, policy, dataset, layout)
    finally:
        set_sequence_parallel(None)


def _train(recipe, run_dir: Path, world, policy: VideoPolicy, dataset: PairSet, layout: ParallelLayout
           ) -> dict[str, Any]:
    vg, cached = recipe.videogpa, dataset.cached
    task = DPOTask(recipe, policy, dataset, world, layout)
    module = task.module
    held_bytes = parameter_bytes(module.network, module.reference)
    stage_dir = run_dir / "train"
    trainer = Trainer(recipe, task, stage_dir, world)
    d = recipe.distributed
    trainer.log.info(f"videogpa train: {world.size} rank(s) on {world.device.type} ({layout.describe()}) | policy "
                     f"{policy.kind} | DeepSpeed ZeRO-{d.zero_stage} | {trainer.describe_precision()} | "
                     f"{trainer.trained_parameters / 1e6:.2f}M trained parameters | {len(dataset)} pairs")
    trainer.resume("auto")

    mine_eval, eval_batches = eval_share(list(range(min(vg.dpo.eval_pairs, len(dataset)))), world.rank, world.size)
    before_file = stage_dir / "eval_before.json"
    before = read_marker(before_file)
    if before is None:
        before = _reduce_accuracy(implicit_accuracy(module, policy, dataset, mine_eval, vg.dpo.eval_draws,
                                                    recipe.seed, cached, batches=eval_batches), world)
        if world.is_main:
            write_marker(before_file, before)

    began = time.perf_counter()
    finish = trainer.fit()
    train_seconds = time.perf_counter() - began
    after = _reduce_accuracy(implicit_accuracy(module, policy, dataset, mine_eval, vg.dpo.eval_draws,
                                               recipe.seed, cached, batches=eval_batches), world)
    summary = {
        "steps": recipe.schedule.steps, "train_pairs": len(dataset), "reference": vg.reference_mode(), "lora": vg.lora.enabled,
        "implicit_acc_before": before["implicit_acc"], "implicit_acc_after": after["implicit_acc"],
        "reward_margin_before": before["reward_margin"], "reward_margin_after": after["reward_margin"],
        "pairs_evaluated": after["pairs_evaluated"], "last": {k: finish.get(k) for k in PARTS if k in finish},
        "parameter_bytes": held_bytes, "trainable_parameters": trainer.trained_parameters,
        "peak_memory_bytes": peak_memory_bytes(world.device), "train_seconds": train_seconds,
    }
    _save_final(run_dir, module, policy, world, recipe.distributed.zero_stage, vg.lora.enabled, summary)
    trainer.release()
    if world.is_main:
        trainer.log.info(finish["text"])
        trainer.log.info(f"train: implicit accuracy on {int(after['pairs_evaluated'])} training pair draws "
                    f"{before['implicit_acc']:.3f} -> {after['implicit_acc']:.3f}, reward margin "
                    f"{before['reward_margin']:.3g} -> {after['reward_margin']:.3g}; final weights in {run_dir / 'final'}")
    return summary


__all__ = ["DPOTask", "PairSet", "build_dpo_module", "cache_latents", "eval_share", "implicit_accuracy", "pair_noise",
           "prepare_batch", "run_train_stage"]
