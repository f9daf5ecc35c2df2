"""LoRA adapters (peft) on the policy network, the DPO reference, and adapter files.

- :func:`add_lora` wraps the network in a ``peft.PeftModel`` with LoRA on the attention projections
  (default r 64, α 128, dropout 0); only the adapters train.
- The reference of DPO is either the same network with its adapters disabled (``disable_adapter()``:
  no second copy of the base weights) or, for full fine-tuning, a frozen deep copy (:func:`frozen_copy`).
- :func:`save_adapter` writes peft's format (``adapter_model.safetensors`` + ``adapter_config.json``),
  gathering ZeRO-3 partitions first, atomically (temporary folder + rename). It loads back with
  ``peft.PeftModel.from_pretrained(fresh_network, folder)`` (:func:`load_adapter`); diffusers policies
  also get ``pytorch_lora_weights.safetensors`` for diffusers' ``load_lora_weights``.

Adapters from files onto a policy (VideoGPA's released ones with their official key names, and GeoForge's
own), for generation and as the start of further DPO: :mod:`engine.videogpa.adapters`.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from pathlib import Path

from torch import nn

from geoforge.engine.atomic import atomic_dir


def lora_config(cfg, default_targets: str | list[str]):
    """A ``peft.LoraConfig`` from a :class:`engine.videogpa.config.LoraConfig`."""
    from peft import LoraConfig

    targets = cfg.targets if cfg.targets is not None else default_targets
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      init_lora_weights=True)


def add_lora(network: nn.Module, cfg, default_targets: str | list[str]) -> nn.Module:
    """``network`` wrapped by peft with LoRA adapters (B = 0 at init: the output is unchanged).

    Raises ValueError naming the targets when none of the network's modules match them."""
    from peft import get_peft_model

    config = lora_config(cfg, default_targets)
    try:
        model = get_peft_model(network, config)
    except ValueError as err:
        raise ValueError(f"videogpa.lora.targets={config.target_modules!r} match no module of the "
                         f"{type(network).__name__} policy network: {err}") from err
    return model


def frozen_copy(network: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen, in eval mode (the reference of full fine-tuning)."""
    ref = copy.deepcopy(network)
    ref.requires_grad_(False)
    return ref.eval()


@contextmanager
def adapters_disabled(network: nn.Module):
    """The peft network with its adapters switched off (the base model) inside the block."""
    disable = getattr(network, "disable_adapter", None)
    if disable is None:
        raise TypeError(f"{type(network).__name__} has no LoRA adapters to disable (wrap it with add_lora)")
    with disable():
        yield network


def _gathered(params: list[nn.Parameter], zero_stage: int):
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def save_adapter(network: nn.Module, directory: Path, zero_stage: int = 0, is_main: bool = True,
                 diffusers_pipeline: type | None = None) -> Path:
    """Write the adapters of a peft ``network`` into ``directory`` (replaced atomically).

    Collective under ZeRO-3 (every rank calls it; only ``is_main`` writes). With ``diffusers_pipeline``
    (a diffusers pipeline class with ``save_lora_weights``), also ``pytorch_lora_weights.safetensors``
    keyed ``transformer.*`` for ``pipeline.load_lora_weights``.
    """
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    trainable = [p for p in network.parameters() if p.requires_grad]
    with _gathered(trainable, zero_stage):
        if not is_main:
            return directory
        with atomic_dir(directory) as tmp:
            network.save_pretrained(str(tmp))
            if diffusers_pipeline is not None:
                prefix = "base_model.model."   # peft's wrapper prefix; diffusers keys are relative to the transformer
                layers = {k.removeprefix(prefix): v.detach().float().cpu().contiguous()
                          for k, v in get_peft_model_state_dict(network).items()}
                config = network.peft_config["default"].to_dict()   # r, lora_alpha, targets: the scaling α / r
                config["target_modules"] = sorted(config["target_modules"]) if isinstance(
                    config["target_modules"], (set, list)) else config["target_modules"]
                diffusers_pipeline.save_lora_weights(str(tmp), transformer_lora_layers=layers,
                                                     transformer_lora_adapter_metadata=config)
    return directory


def load_adapter(network: nn.Module, directory: str | Path, trainable: bool = False) -> nn.Module:
    """A fresh base ``network`` with the peft adapters of ``directory`` (``PeftModel.from_pretrained``)."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory}: no adapter_config.json (not a peft adapter folder)")
    return PeftModel.from_pretrained(network, str(directory), is_trainable=trainable)


def parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers held by ``modules`` (shared tensors counted once)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


__all__ = ["lora_config", "add_lora", "frozen_copy", "adapters_disabled", "save_adapter", "load_adapter",
           "parameter_bytes"]
