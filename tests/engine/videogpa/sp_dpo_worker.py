"""Worker of test_dpo_sequence_parallel (run under torchrun, 2 CPU ranks, gloo): for each policy case, one
DPOModule (LoRA on the policy, the reference = adapters disabled) evaluated on whole clips (sequence
parallelism off) and on token slices (on, the 2 ranks one group); prints the largest relative differences
of the DPO parts on every rank (the policy's and the reference's per-sample errors must be the whole
clip's on each rank) and of the gradients (summed over the group / 2: what DeepSpeed's average applies)."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from geoforge.engine.config import load_recipe
from geoforge.engine.distributed import shutdown
from geoforge.engine.models.sequence_parallel import SequenceParallel, set_sequence_parallel
from geoforge.engine.videogpa.config import PolicyConfig
from geoforge.engine.videogpa.policy import Condition, build_policy
from geoforge.engine.videogpa.train_dpo import build_dpo_module, pair_noise

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from sp_compare import grad_error, init_gloo, part_error  # noqa: E402
from test_diffusers_policies import TINY  # noqa: E402

DIFFUSERS_GEOMETRY = ["videogpa.generate.frames=9", "videogpa.generate.height=32", "videogpa.generate.width=32"]


def build(case: dict):
    kind = case["kind"]
    overrides = ["videogpa.lora.rank=4", "videogpa.lora.alpha=4"]
    if case.get("full"):   # full fine-tuning: every weight trained, the reference a frozen copy
        overrides.append("videogpa.lora.enabled=false")
    if kind == "dit":
        overrides += ["data.frames=4", "data.resolution=16", "model.depth=2"]   # 4 x 16 = 64 tokens
    else:
        overrides += DIFFUSERS_GEOMETRY
    recipe = load_recipe("videogpa_tiny", overrides)
    if kind != "dit":
        tiny = json.loads(json.dumps(TINY[kind]))
        tiny["transformer"].update(case.get("transformer", {}))
        recipe.videogpa.policy = PolicyConfig(kind=kind, tiny_config=tiny, text_encoder=False, max_text_tokens=8)
    policy = build_policy(recipe)
    if kind != "dit":
        policy.enable_sequence_parallel()   # hooks and processors; a no-op while no group is installed
    module = build_dpo_module(recipe, policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():   # LoRA B = 0 at init would make the policy the reference
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.1)
            elif case.get("full") and name.startswith("network."):
                p.add_(torch.randn_like(p), alpha=0.01)
    if case.get("ckpt"):
        policy.enable_activation_checkpointing()
    return recipe, policy, module


def inputs(policy, recipe, kind: str):
    g = torch.Generator().manual_seed(2)
    b = 2
    size = policy.height
    conds = []
    for i in range(b):
        c = Condition(key=str(i), first_frame=torch.rand(3, size, size, generator=g))
        if kind == "dit":
            k = torch.tensor([[20.0, 0, size / 2], [0, 20.0, size / 2], [0, 0, 1]])
            c.intrinsics = k.expand(policy.frames, 3, 3)
            ext = torch.eye(3, 4).repeat(policy.frames, 1, 1)
            ext[:, 2, 3] = torch.arange(policy.frames, dtype=torch.float32) * 0.1
            c.extrinsics = ext
        c = policy.prepare_condition(c)
        if c.prompt_embeds is not None:   # random prompts (no text encoder here): a text stream that matters
            c.prompt_embeds = torch.randn(c.prompt_embeds.shape, generator=g)
        conds.append(c)
    cond = policy.batch_condition(conds)
    with torch.no_grad():
        x_w = policy.encode(torch.rand(b, policy.frames, 3, size, size, generator=g))
        x_l = policy.encode(torch.rand(b, policy.frames, 3, size, size, generator=g))
    noise = pair_noise(policy, tuple(x_w.shape[1:]), [0, 1], recipe.seed, 3)
    return x_w, x_l, cond, noise


def main() -> None:
    cases = json.loads(sys.argv[1])
    rank, n = init_gloo()
    group = dist.new_group(list(range(n)))
    calls = {"all_to_all": 0}
    all_to_all = dist.all_to_all_single

    def counted(*args, **kwargs):   # proves the sharded run communicates (it would also match if it did not)
        calls["all_to_all"] += 1
        return all_to_all(*args, **kwargs)

    dist.all_to_all_single = counted
    results = {}
    for case in cases:
        recipe, policy, module = build(case)
        module.train()
        x_w, x_l, cond, noise = inputs(policy, recipe, case["kind"])

        def run():
            module.zero_grad()
            out = module(x_w, x_l, cond, noise)
            out["loss"].backward()
            return ({k: float(v.detach()) for k, v in out.items()},
                    {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None})

        set_sequence_parallel(None)
        full_parts, full_grads = run()
        before = calls["all_to_all"]
        set_sequence_parallel(SequenceParallel(group, n, rank))
        parts, grads = run()
        set_sequence_parallel(None)
        sharded_calls = calls["all_to_all"] - before
        part_err = part_error(full_parts, parts, n, mean_over_ranks=False)   # every rank: the whole-clip values
        grad_err, worst, missing = grad_error(full_grads, grads, n)
        results[case["name"]] = {"part_err": part_err, "grad_err": grad_err, "worst": worst, "parts": full_parts,
                                 "params": len(full_grads), "all_to_all": sharded_calls,
                                 "missing": missing}
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
