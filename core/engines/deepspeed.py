"""DeepSpeed ZeRO engine (stages 1, 2, 3): one DeepSpeed engine per trained part, DeepSpeed's own checkpoints.

Same interface as ``core.engines.fsdp2.FSDP2Engine`` (see docs/architecture.md); the trainer does not know
which engine it drives.

Wrapping (``DeepSpeedEngine.prepare``), in this order:

1. parameters are cast to fp32 (DeepSpeed keeps the fp32 master copy of the trainable parameters in the
   ZeRO optimizer's flat partitions; with ``precision="bf16"`` it casts the module's *parameters* — not its
   buffers, since DeepSpeed 0.19 — to bf16 for compute; with ``precision="bf16-autocast"`` the parameters stay
   fp32 and DeepSpeed's ``torch_autocast`` section runs the forward under ``torch.autocast(bf16)``, gradients
   reduced in fp32, like the FSDP2 engine's mode of that name);
2. a fp32 CPU snapshot of the frozen parameters (``requires_grad=False``, e.g. LightningDiT's ``pos_embed``)
   is taken: they are not in the optimizer, so DeepSpeed has no fp32 copy of them once it cast them to bf16;
3. every block of ``getattr(model, blocks_attr)`` optionally gets activation checkpointing and
   ``torch.compile`` *applied to its ``forward`` in place* (``torch.utils.checkpoint`` non-reentrant — the
   mechanism behind FSDP2's ``checkpoint_wrapper(NO_REENTRANT)`` — and ``torch.compile(block.forward)``;
   compile is skipped with a warning under ZeRO-3, whose per-sub-module parameter-gathering hooks are
   excluded from compilation and would break the graph at every sub-module).
   Unlike FSDP2 we do not insert a ``checkpoint_wrapper`` module: DeepSpeed bakes ``named_parameters()``
   names into its checkpoint files (ZeRO ``param_shapes``, the universal checkpoint's ``zero/<name>/``
   folders, ``zero_to_fp32`` output), and a wrapper would add ``._checkpoint_wrapped_module.`` to every
   block parameter name — a universal checkpoint written with checkpointing on could then not be resumed
   with it off (typically what one changes together with the number of GPUs). In place, names stay the
   model's own (official) names;
4. the optimizer is the same torch AdamW/Adam that FSDP2 uses (``core.engines.base.build_optimizer``), handed
   to ``deepspeed.initialize(model=, optimizer=, config=)``; ZeRO re-points its param groups at ZeRO's flat
   fp32 partitions. Why not DeepSpeed's FusedAdam/CPUAdam: the update rule and hyper-parameters are then
   identical to the FSDP2 engine's (the two engines agree to fp32 rounding, see the tests), and nothing has to
   be compiled (DeepSpeed is installed with ``DS_BUILD_OPS=0``; its fused optimizers would be JIT-built with
   a CUDA/C++ toolchain at start-up); on CUDA, torch's fused AdamW is also one multi-tensor kernel, here over
   one flat tensor per group. With ``offload_optimizer`` the torch optimizer (foreach) steps the CPU
   partitions — ``zero_force_ds_cpu_optimizer`` is turned off to allow that; DeepSpeed's ``DeepSpeedCPUAdam``
   would likely be faster there (not measured);
5. ``deepspeed.initialize`` with ``config=ds_config(...)``: ZeRO ``stage`` from ``engine.zero_stage``,
   ``overlap_comm``, ``reduce_bucket_size``/``allgather_bucket_size`` from ``engine.bucket_size``, optional
   ``offload_optimizer: {device: cpu}`` (stages 2/3 as documented by DeepSpeed; stage 1 accepts it too),
   bf16 with fp32 gradient accumulation and fp32 gradient reduction (like FSDP2's ``reduce_dtype=fp32``), and
   ``gradient_clipping`` from ``train.grad_clip``. bf16 + stage 1 + fp32 gradient accumulation is DeepSpeed's
   ``BF16_Optimizer`` (its ZeRO-1 implementation for bf16): same partitioning, same checkpoint tooling.

Two trained parts (VA-VAE: autoencoder + discriminator) are two ``prepare`` calls and therefore two
DeepSpeed engines: a DeepSpeed engine drives exactly one optimizer (``deepspeed.initialize`` takes one), and
DeepSpeed's GAN tutorial (https://www.deepspeed.ai/tutorials/gan/) initialises the generator and the
discriminator as two engines in the same way. Each part has its own config, ZeRO partitions and checkpoint
sub-directory.

Gradient accumulation. The trainer calls ``part.backward(loss / accum, sync=(last micro-batch))`` for every
micro-batch and ``part.step()`` once. DeepSpeed is configured with ``gradient_accumulation_steps=1`` (its
``backward`` then divides the loss by 1: the trainer's own ``/accum`` is the only scaling) and the boundary is
set explicitly before every backward with ``set_gradient_accumulation_boundary(sync)`` — DeepSpeed's
documented pattern for caller-controlled accumulation. ``step()`` only runs after a ``sync=True`` backward,
which is a boundary, so DeepSpeed steps exactly once per optimizer step and never early. Communication:
stage 1 reduces only at the boundary (gradients accumulate locally, like FSDP2's ``sync=False``); stages 2
and 3 partition gradients as they are produced, so they reduce-scatter on every micro-batch whatever
``sync`` says (DeepSpeed's ``no_sync`` is refused for them) — the result is the same sum.

EMA. For every stage the EMA is kept *partitioned exactly like the fp32 master weights*: one fp32 tensor per
ZeRO flat partition (``single_partition_of_fp32_groups`` for stages 1/2, ``fp32_groups_flat_partition`` for
the bf16 stage-1 optimizer, ``fp32_partitioned_groups_flat`` for stage 3; one such EMA per decay of
``train.ema_decays``: ``part.emas``, ``part.ema`` the first, saved in ``ema.pt`` as ``ema`` and ``emas``), updated with one fused
``torch._foreach_lerp_`` over the local partitions after each applied step — the EMA of the fp32 master
weights, like FSDP2's, with no communication. Memory: 4 bytes x parameters / world size per rank (same as the
FSDP2 engine; less than a full copy per rank), on the CPU when the optimizer is offloaded. ``part.ema`` is a
``ZeroShardedEMA`` holding those partitions; the full EMA state dict (the model's own key names) is assembled
on demand with ``full_state_dict("ema")`` (collective). Frozen parameters are not averaged: the EMA of a
parameter that never changes is that parameter (the FSDP2 EMA stays equal to it too); the EMA state dict's
buffers are the model's current ones (FSDP2's EMA module keeps the buffers it copied at ``prepare``; the same
for buffers that never change, such as LightningDiT's RoPE tables).

Non-finite gradients. DeepSpeed's ZeRO optimizers check the global gradient norm inside ``step``: when it is
NaN/inf (all-reduced, so every rank agrees) they drop the gradients and return without touching weights or
optimizer state (``bf16.check_grad_overflow`` is enabled so bf16 behaves like fp32). We then skip the EMA
update too, so model, optimizer moments and EMA are unchanged — like FSDP2. What differs: DeepSpeed's own
counters advance (``global_steps`` and ``skipped_steps`` both +1; they only feed DeepSpeed's logging), and
the norm DeepSpeed reports for a skipped step is ``+inf`` even when the gradients held NaN.

Checkpoints (collective ``save``/``load``), inside the directory the ``CheckpointManager`` commits atomically::

    <ckpt_dir>/deepspeed/<part>/state/            engine.save_checkpoint(save_dir=<ckpt_dir>/deepspeed/<part>,
                                                    tag="state"): model states + per-rank ZeRO optimizer states
    <ckpt_dir>/deepspeed/<part>/latest            "state" (so DeepSpeed's own tools find the tag)
    <ckpt_dir>/deepspeed/<part>/ema.pt            rank 0: {"ema": full fp32 EMA state dict, "frozen": ..., "meta": ...}
    <ckpt_dir>/deepspeed/<part>/universal/        only after a resume on another world size (see below)
    <ckpt_dir>/extra/rank{r:05d}.pt               this rank's ``extra``, written by ``core.checkpoint`` (any engine)

The EMA is gathered into one full state dict (model key names) because it is then independent of the world
size and of the ZeRO stage, and ``tools/export.py`` reads it directly. Cost at each save: one reduce per
64 Mi-element bucket and a full fp32 copy in rank 0's CPU memory (4 bytes x parameters).

Resume on another world size: DeepSpeed refuses to load ZeRO optimizer partitions written by another number
of ranks. ``load`` then uses DeepSpeed's *universal checkpoint*: if ``<part>/universal`` does not exist yet,
rank 0 runs DeepSpeed's converter — the code of ``python -m deepspeed.checkpoint.ds_to_universal
--input_folder <part>/state --output_folder <part>/universal``, in process — into a temporary folder renamed
when complete, every rank waits, and the engine loads it with DeepSpeed's ``load_universal`` (fp32 weights,
Adam moments and step, re-partitioned for the new world). The conversion can be run ahead of time with that
command (then ``load`` just uses it); for large models that is advisable, since the other ranks wait for it in
a collective (default timeout 10 min with NCCL).
The world size a checkpoint was written with is ``meta["world_size"]`` of each part's ``ema.pt``. ``extra``
follows the rule of ``core.checkpoint`` for every engine: rank 0's, with ``world_size_changed=True``.

DeepSpeed internals this file relies on (checked by tests/integration/test_engine_deepspeed.py against the pinned
DeepSpeed 0.19): the ZeRO optimizers' flat fp32 partitions and parameter groups named above, ``param._hp_mapping``
(stages 1/2: fragment addresses), ``grad_position``/``get_param_id``/``_get_param_partition_rank`` (stage 3),
the inner torch optimizer's ``state`` keyed by the flat partitions, and ``engine._config.load_universal_checkpoint``
(switched on for the universal load only). Partial grads (``_DirectForward``, checked by
tests/integration/test_vavae_deepspeed.py): the engine's ``_backward_prologue``/``_backward_prologue_per_tensor``
and the ``applied_pre_backward_ref_cnt`` of ZeRO-3's sub-module hooks.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.config import EngineConfig, OptimizerConfig
from core.distributed import DistInfo, barrier, raise_if_any_rank_failed
from core.ema import ema_index, ema_key, ema_update_
from core.engines.base import (
    Engine,
    TrainedPart,
    block_container,
    build_optimizer,
    canonical_name,
    cast_to_fp32_,
    check_ema_decay,
    compile_forwards,
    meta_skeleton,
    warn_skipped_block_options,
)
from core.fileio import atomic_torch_save, fsync_dir

log = logging.getLogger(__name__)

DS_DIR = "deepspeed"  # <ckpt_dir>/deepspeed/<part>/
TAG = "state"  # DeepSpeed checkpoint tag (one checkpoint per CheckpointManager directory)
UNIVERSAL_TAG = "universal"  # ds_to_universal output folder, next to the tag folder
EMA_FILE = "ema.pt"
# Elements per collective when assembling full state dicts (64 Mi fp32 = 256 MiB per bucket).
GATHER_BUCKET_ELEMENTS = 64 * 1024 * 1024


def part_dir(ckpt_dir: Path, name: str) -> Path:
    return Path(ckpt_dir) / DS_DIR / name


SHM_COMM_ENV = "LLAT_DEEPSPEED_SHM_COMM"  # "0": do not build DeepSpeed's CPU shared-memory comm op (CPU runs only)


def _import_deepspeed(device: torch.device, strict: bool = True):
    """Import DeepSpeed with the accelerator matching ``device`` (``DS_ACCELERATOR=cpu`` for CPU/gloo runs)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if device.type == "cpu" and os.environ.get(SHM_COMM_ENV, "1") == "0":
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op (an inference kernel; ZeRO's collectives
        # go through the gloo group either way). Marking it incompatible skips the build (~40 s per fresh
        # extensions directory, and no stale build lock after a kill): deepspeed.comm then falls back to torch.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    accel = get_accelerator().device_name()
    if strict and accel != device.type:
        raise RuntimeError(
            f"DeepSpeed selected the {accel!r} accelerator but this rank trains on {device}: set "
            f"DS_ACCELERATOR={device.type} before DeepSpeed is first imported"
        )
    return deepspeed


def ds_config(cfg: EngineConfig, world_size: int, grad_clip: Optional[float] = None) -> dict[str, Any]:
    """The DeepSpeed config for one part. Batch sizes are bookkeeping only (the trainer feeds the batches)."""
    if cfg.zero_stage not in (1, 2, 3):
        raise ValueError(
            f"engine.zero_stage: the DeepSpeed engine runs ZeRO stage 1, 2 or 3, got {cfg.zero_stage} "
            "(stage 0 is plain data parallelism: use engine.kind=fsdp2 or a ZeRO stage)"
        )
    if cfg.precision not in ("bf16", "bf16-autocast", "fp32"):
        raise ValueError(
            f"engine.precision: unknown precision {cfg.precision!r} (expected 'bf16', 'bf16-autocast' or 'fp32')"
        )
    bucket = max(2, int(cfg.bucket_size) // 2 * 2)  # allgather bucket must be a multiple of 2
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "overlap_comm": bool(cfg.overlap_comm),
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "load_from_fp32_weights": True,
    }
    if cfg.zero3_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(cfg.zero3_persistence_threshold)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    bf16 = cfg.precision == "bf16"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # the trainer accumulates and scales; see the module docstring
        "train_batch_size": world_size,
        "gradient_clipping": float(grad_clip) if grad_clip else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,  # torch AdamW, see the module docstring
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
    }
    if cfg.precision == "bf16-autocast":
        # fp32 ZeRO, forward under torch.autocast(bf16). DeepSpeed's forward switches off an autocast opened outside
        # it (on CUDA) unless its own `torch_autocast` section is on; with no lower-precision-safe modules every
        # gradient is still reduced in fp32 (DeepSpeed would otherwise reduce Linear/Conv gradients in bf16).
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


def _run_ds_to_universal(argv: list[str]) -> None:
    """``python -m deepspeed.checkpoint.ds_to_universal ARGV``, in this process (serial: one worker each).

    Same argument parsing and code as the command line; in-process saves a second interpreter importing torch
    and DeepSpeed. It reads the checkpoint files only (no process group)."""
    from deepspeed.checkpoint import ds_to_universal

    saved = sys.argv
    sys.argv = ["ds_to_universal", *argv]
    try:
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = saved
    ds_to_universal.main(args)


def _checkpointed(forward):
    """``forward`` under non-reentrant activation checkpointing (the module object and its names unchanged)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


# ---------------------------------------------------------------------------------------------------- layout
class _Layout:
    """Where each trainable parameter's fp32 master values live in this rank's ZeRO flat partitions.

    ``fragments[name]`` lists ``(flat_index, flat_start, full_start, numel)``: elements
    ``[full_start, full_start + numel)`` of the flattened full parameter are elements
    ``[flat_start, flat_start + numel)`` of this rank's flat partition ``flat_index``. Every element of every
    trainable parameter is held by exactly one rank, so summing zero-filled buffers over ranks rebuilds it.
    """

    def __init__(self, ds_engine, names: dict[int, str]):
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        opt = ds_engine.optimizer
        self.fragments: dict[str, list[tuple[int, int, int, int]]] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.order: list[str] = []  # trainable parameter names, model order
        if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            self.flat_attr = "fp32_partitioned_groups_flat"
            groups = opt.fp16_groups
            for group in groups:
                for p in group:
                    name = names[id(p)]
                    gi, offset, part_numel = opt.grad_position[opt.get_param_id(p)]
                    start = opt._get_param_partition_rank(p) * part_numel
                    numel = max(0, min(part_numel, p.ds_numel - start))
                    self.fragments[name] = [(int(gi), int(offset), int(start), int(numel))] if numel else []
                    self.shapes[name] = p.ds_shape
        elif isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
            self.flat_attr = (
                "single_partition_of_fp32_groups"
                if isinstance(opt, DeepSpeedZeroOptimizer)
                else "fp32_groups_flat_partition"
            )
            groups = opt.bit16_groups if isinstance(opt, DeepSpeedZeroOptimizer) else opt.bf16_groups
            for group in groups:
                for p in group:
                    name = names[id(p)]
                    m = getattr(p, "_hp_mapping", None)
                    self.fragments[name] = (
                        []
                        if m is None
                        else [
                            (
                                int(m.param_group_index),
                                int(m.hp_fragment_address.start),
                                int(m.lp_fragment_address.start),
                                int(m.hp_fragment_address.numel),
                            )
                        ]
                    )
                    self.shapes[name] = p.shape
        else:
            raise TypeError(f"unsupported DeepSpeed optimizer {type(opt).__name__} (expected a ZeRO optimizer)")
        position = {name: i for i, name in enumerate(names.values())}
        self.order = sorted(self.fragments, key=position.__getitem__)

    def flats(self, ds_engine) -> list[torch.Tensor]:
        """This rank's fp32 master partitions (fetched each time: loading may replace the tensors)."""
        return list(getattr(ds_engine.optimizer, self.flat_attr))

    @torch.no_grad()
    def zero_padding_(self, ds_engine) -> None:
        """Zero the elements of this rank's partitions that hold no parameter element. ZeRO-3 pads the last rank's
        partition of every parameter whose size is not a multiple of the world size, and DeepSpeed 0.19 leaves that
        padding uninitialised in the fp32 partitions (``torch.empty``): checkpoints of two identical runs would
        differ there. The padding never receives a gradient, so Adam keeps it at 0 (the moments stay 0). Stages 1/2
        already zero their alignment padding (a no-op there)."""
        for fi, flat in enumerate(self.flats(ds_engine)):
            covered = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            for fragments in self.fragments.values():
                for f, fs, _, n in fragments:
                    if f == fi:
                        covered[fs : fs + n] = True
            flat.view(-1).masked_fill_(~covered, 0.0)


# ---------------------------------------------------------------------------------------------------- EMA
class ZeroShardedEMA(nn.Module):
    """EMA of the fp32 master weights, partitioned like them (one fp32 tensor per ZeRO flat partition).

    Not callable: ``DeepSpeedPart.full_model("ema")`` (collective) gives a plain model holding the full EMA weights;
    ``DeepSpeedPart.full_state_dict("ema")`` the full state dict.
    """

    def __init__(self, flats: Iterable[torch.Tensor]):
        super().__init__()
        self.flats = [f.detach().clone() for f in flats]
        self.requires_grad_(False)
        self.eval()

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "the DeepSpeed engine's EMA is partitioned like the ZeRO master weights and cannot run "
            "a forward pass: use `with part.full_model('ema') as model:` (collective)"
        )


# ---------------------------------------------------------------------------------------------------- part
# The pre-backward reference count of every ZeRO-3 sub-module after a forward with partial grads on: "never
# exhausted", so every backward pass through a sub-module gathers its parameters first (see _DirectForward).
ZERO3_GATHER_EVERY_PASS = 2**62


def _set_zero3_pre_backward_count(module: nn.Module, count: int) -> None:
    """Set the pre-backward reference count of ZeRO-3's hooks on ``module`` and its sub-modules (DeepSpeed 0.19.8
    ``DeepSpeedZeRoOffload._register_deepspeed_module``: each forward adds 1 to a sub-module's
    ``applied_pre_backward_ref_cnt``; its pre-backward hook gathers the sub-module's parameters only while the
    count is > 0, and decrements it)."""
    for m in module.modules():
        if "applied_pre_backward_ref_cnt" in m.__dict__:
            m.applied_pre_backward_ref_cnt = count


class _DirectForward:
    """The forward of a DeepSpeed part whose outputs the task differentiates with ``autograd.grad`` before its
    backward (``TrainedPart.set_partial_grads``). Calls the wrapped model itself, with what DeepSpeed's
    ``engine.forward`` adds around it except its output hooks (DeepSpeed 0.19.8 ``DeepSpeedEngine.forward``):

    * ``optimizer.clear_backward_seen_flag()`` (ZeRO's deferred per-backward bookkeeping);
    * ``autocast_if_enabled(engine)`` (the engine's ``torch_autocast`` section, precision ``bf16-autocast``);
    * the engine's forward pre/post hooks (timers; ZeRO-3's external-parameter discovery) and every ZeRO-3
      sub-module hook (parameter gathering and release, in forward and in backward) are module hooks: they run
      either way.

    Not added: ``register_output_backward_hooks`` on the outputs, whose hook runs DeepSpeed's backward prologue
    (``_backward_prologue``: ``enter_backward`` + a queued post-backward callback that runs the reduction
    epilogue) in whatever backward pass first reaches an output. ``DeepSpeedPart.backward`` registers that same
    hook on the loss. DeepCompile (not used by this engine) would need the engine's forward.

    Added for ZeRO-3: after the forward, the pre-backward reference count of every sub-module is set to
    ``ZERO3_GATHER_EVERY_PASS``. ZeRO-3 releases a sub-module's parameters after its forward and gathers them again
    in a pre-backward hook on its outputs, but only while a per-sub-module count is > 0: one per forward call,
    spent by the first backward pass that reaches the outputs. The partial ``autograd.grad`` passes spend it, and a
    sub-module whose post-backward hook then released its parameters (a pass that went through all of it) would
    meet the next pass — the next partial pass or the real backward — with its parameters still released (a
    convolution's weight of ZeRO-3's empty placeholder). With the count never exhausted, every pass gathers the
    parameters of each sub-module it reaches before using them (a no-op when they are still gathered). Release:
    ZeRO-3's post-backward hook of a sub-module fires when its count of inputs awaiting gradients reaches 0, i.e.
    once, in the first pass that goes through all of it; what a later pass gathers again stays gathered until the
    end of the part's backward, whose epilogue releases every sub-module left over
    (``PartitionedParameterCoordinator.release_backward_leftovers``; ``step`` re-partitions everything after the
    update either way). Memory: up to the whole part gathered during its backward, like FSDP2's single unit
    (``blocks_attr=None``). Gradients: ``autograd.grad`` never runs the parameters' gradient-accumulation nodes, so
    ZeRO-3's reduce hooks fire in the real backward only. Without partial grads, ZeRO-3's own counts are put back
    (``set_partial_grads(False)``, between steps).
    Attribute access goes to the wrapped model (``part.module.decoder.conv_out.weight``)."""

    def __init__(self, ds_engine):
        self._engine = ds_engine

    def __call__(self, *args, **kwargs):
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        engine = self._engine
        if isinstance(engine.optimizer, ZeROOptimizer):
            engine.optimizer.clear_backward_seen_flag()
        with autocast_if_enabled(engine):
            out = engine.module(*args, **kwargs)
        if engine.zero_optimization_partition_weights():
            _set_zero3_pre_backward_count(engine.module, ZERO3_GATHER_EVERY_PASS)
        return out

    def __getattr__(self, name: str):
        return getattr(self._engine.module, name)


class DeepSpeedPart(TrainedPart):
    """A model wrapped in a DeepSpeed ZeRO engine + its (partitioned) EMA.

    ``module`` is the DeepSpeed engine (call it for the forward pass); ``engine`` is the same object;
    ``optimizer`` (alias ``base_optimizer``) is the torch optimizer DeepSpeed steps (its param groups carry the
    learning rate).
    """

    def __init__(
        self,
        name: str,
        ds_engine,
        base_optimizer: torch.optim.Optimizer,
        ema_decay: Optional[float | Sequence[float]],
        state_keys: list[str],
        frozen: dict[str, torch.Tensor],
        device: torch.device,
        stage: int,
        precision: str,
        skeleton: Optional[nn.Module] = None,
    ):
        super().__init__(name, ds_engine, None, base_optimizer, ema_decay, device, skeleton)
        self.engine = ds_engine
        self._partial_grads = False  # set_partial_grads
        self.base_optimizer = base_optimizer
        self.stage = stage
        self.precision = precision
        self.state_keys = state_keys  # the model's state_dict keys, in order (official names)
        self.frozen = frozen  # fp32 CPU snapshot of the frozen parameters
        inner = ds_engine.module
        first = {}  # id(param) -> its first name (tied parameters: one entry)
        self._alias = {}  # every parameter name -> the name the layout uses
        for n, p in inner.named_parameters(remove_duplicate=False):
            self._alias[canonical_name(n)] = first.setdefault(id(p), canonical_name(n))
        self._buffers = {canonical_name(n): b for n, b in inner.named_buffers()}
        self.layout = _Layout(ds_engine, first)
        self.layout.zero_padding_(ds_engine)
        # One partitioned EMA per decay (train.ema_decays); the first is `ema`.
        self.emas = [ZeroShardedEMA(self.layout.flats(ds_engine)) for _ in self.ema_decays]
        self.ema = self.emas[0] if self.emas else None

    # ------------------------------------------------------------------ training
    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(bool(sync))
        if self._partial_grads:
            # The forward ran without DeepSpeed's output hooks (_DirectForward): start DeepSpeed's backward
            # machinery where the real backward starts, at the loss — before any gradient reaches the module, as
            # the output hooks would. Partial autograd.grad passes never reach this tensor.
            from deepspeed.runtime.utils import register_output_backward_hooks

            register_output_backward_hooks(
                loss,
                preprocess_once_fn=self.engine._backward_prologue,
                preprocess_per_tensor_fn=self.engine._backward_prologue_per_tensor,
            )
        self.engine.backward(loss)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """DeepSpeed's step (norm, clip, optimizer, zero grad; skipped on a non-finite norm), then the EMA.

        Returns the pre-clip global gradient norm as a 0-dim fp32 tensor on this rank's device (``+inf`` for a
        skipped step). Must follow a ``backward(..., sync=True)``.

        Host syncs: DeepSpeed's ZeRO optimizers decide the skip on the host (their overflow check reads an
        all-reduced flag with ``.item()``, once per step, inside ``engine.step()``); DeepSpeed's API offers no
        device-side skip. This method adds no read of its own: the norm stays on the device (DeepSpeed keeps it as
        a tensor, or as a float for a skipped step) and ``was_step_applied()`` is DeepSpeed's host-side flag.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"{self.name}: step() without a preceding backward(sync=True)")
        self.engine.step()
        raw = self.engine.get_global_grad_norm()
        if isinstance(raw, torch.Tensor):
            norm = raw.detach().to(device=self.device, dtype=torch.float32).reshape(()).clone()
        else:
            norm = torch.full((), float("nan") if raw is None else float(raw), dtype=torch.float32, device=self.device)
        applied = self.engine.was_step_applied()
        if not applied:  # a finite norm cannot be skipped with fp32/bf16; be explicit (on device)
            norm = torch.where(torch.isfinite(norm), float("inf"), norm)
        if applied:
            masters = self.layout.flats(self.engine)
            for ema, decay in zip(self.emas, self.ema_decays):
                ema_update_(ema.flats, masters, decay)
        return norm

    def set_reshard_after_forward(self, reshard: bool) -> None:
        """A no-op on every stage. ZeRO-1/2 never shard the parameters. ZeRO-3 releases a sub-module's parameters
        after its forward in its own hooks (no per-module switch), but in place: a parameter attribute stays the
        very tensor object the forward used (ZeRO-3 swaps its storage), and the sub-module's pre-backward hook
        gathers it again before any backward op reads it — in every ``autograd.grad`` pass too while
        ``set_partial_grads(True)`` (see ``_DirectForward``). So ``autograd.grad`` w.r.t. a parameter attribute
        read after the forward gives the full gradient, which is what ``reshard=False`` is for. (Its ``.shape``
        between forward and backward is ZeRO-3's empty placeholder; use ``ds_shape``.)"""

    def set_partial_grads(self, enabled: bool) -> None:
        """On: ``module`` becomes a ``_DirectForward`` that calls the wrapped model without DeepSpeed's engine
        forward, whose output hooks would run DeepSpeed's backward prologue — and queue its reduction epilogue — on
        every ``autograd.grad`` through the outputs; ``backward`` registers the same prologue on the loss instead.
        See ``_DirectForward``."""
        if self._partial_grads is not bool(enabled):
            self._partial_grads = bool(enabled)
            self.module = _DirectForward(self.engine) if enabled else self.engine
            if not enabled and self.stage == 3:
                # back to ZeRO-3's own count (between steps: no forward waits for its backward)
                _set_zero3_pre_backward_count(self.engine.module, 0)

    # ------------------------------------------------------------------ full state (collective)
    def _partitions(self, which: str) -> list[torch.Tensor]:
        masters = self.layout.flats(self.engine)
        if which == "model":
            return masters
        if which.startswith("ema"):
            return self.emas[ema_index(which, len(self.emas), self.name)].flats
        state = self.engine.optimizer.optimizer.state  # the torch optimizer's state, keyed by the flat partitions
        return [state[m][which] if m in state else torch.zeros_like(m) for m in masters]

    @torch.no_grad()
    def gather(self, which: str = "model", rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Collective: full fp32 CPU tensors of the trainable parameters from this part's partitions.

        ``which``: ``"model"`` (fp32 master weights), ``"ema"``, or an optimizer state key (``"exp_avg"``,
        ``"exp_avg_sq"``). With ``rank0_only`` the other ranks get an empty dict.
        """
        flats = self._partitions(which)
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        keep = (not rank0_only) or (not tdist.is_initialized()) or tdist.get_rank() == 0
        out: dict[str, torch.Tensor] = {}
        names = self.layout.order
        i = 0
        while i < len(names):
            bucket, total = [], 0
            while i < len(names) and (
                not bucket or total + self.layout.shapes[names[i]].numel() <= GATHER_BUCKET_ELEMENTS
            ):
                bucket.append((names[i], total))
                total += self.layout.shapes[names[i]].numel()
                i += 1
            buf = torch.zeros(total, dtype=torch.float32, device=self.device)
            for name, base in bucket:
                for fi, fs, ps, n in self.layout.fragments[name]:
                    buf[base + ps : base + ps + n].copy_(flats[fi][fs : fs + n])
            if world > 1:
                if rank0_only:
                    tdist.reduce(buf, dst=0)
                else:
                    tdist.all_reduce(buf)
            if keep:
                host = buf.cpu()
                for name, base in bucket:
                    shape = self.layout.shapes[name]
                    out[name] = host[base : base + shape.numel()].view(shape).clone()
        return out

    @torch.no_grad()
    def full_state_dict(self, which: str = "model", rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Collective: the model's full fp32 state dict (its own key names and order) from the partitions.

        ``which="model"``: fp32 master weights; ``"ema"``: the EMA. Frozen parameters come from the fp32
        snapshot taken at ``prepare`` (they never change), buffers from the module (rank 0's).
        """
        trained = self.gather(which, rank0_only=rank0_only)
        if rank0_only and tdist.is_initialized() and tdist.get_rank() != 0:
            return {}
        out: dict[str, torch.Tensor] = {}
        for key in self.state_keys:
            if self._alias.get(key) in trained:
                out[key] = trained[self._alias[key]].clone() if self._alias[key] != key else trained[key]
            elif self._alias.get(key) in self.frozen:
                out[key] = self.frozen[self._alias[key]].clone()
            elif key in self._buffers:
                out[key] = self._buffers[key].detach().cpu().clone()
            else:
                raise KeyError(
                    f"{self.name}: state_dict key {key!r} is neither a trained parameter, a frozen "
                    "parameter nor a buffer"
                )
        return out

    @torch.no_grad()
    def load_ema_state_dict(self, sd: dict[str, torch.Tensor], which: str = "ema") -> None:
        """Not collective: write this rank's partitions of EMA ``which`` from a full EMA state dict (any world
        size)."""
        if not self.emas:
            return
        ema = self.emas[ema_index(which, len(self.emas), self.name)]
        missing = [k for k in self.layout.order if k not in sd]
        if missing:
            raise KeyError(f"{self.name}: EMA state dict lacks {missing[:10]}")
        # Start from the master weights (also fills the alignment padding), then overwrite every fragment.
        ema.flats = [f.detach().clone() for f in self.layout.flats(self.engine)]
        for name in self.layout.order:
            src = sd[name]
            if tuple(src.shape) != tuple(self.layout.shapes[name]):
                raise ValueError(
                    f"{self.name}: EMA {name} has shape {tuple(src.shape)}, the model {tuple(self.layout.shapes[name])}"
                )
            flat = src.reshape(-1)
            for fi, fs, ps, n in self.layout.fragments[name]:
                ema.flats[fi][fs : fs + n].copy_(flat[ps : ps + n])


# ---------------------------------------------------------------------------------------------------- engine
class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO wrapping + DeepSpeed checkpoints. See the module docstring.

    ``compile_kwargs``: keyword arguments for ``torch.compile`` when ``cfg.compile`` (e.g. a backend).
    """

    supports_async_save = False

    def __init__(self, cfg: EngineConfig, dist: DistInfo, compile_kwargs: Optional[dict[str, Any]] = None):
        super().__init__(cfg, dist)
        ds_config(cfg, dist.world_size)  # validate stage / precision early
        if not tdist.is_initialized():
            raise RuntimeError("the DeepSpeed engine needs the process group of core.distributed.init_distributed()")
        self.compile_kwargs = dict(compile_kwargs or {})
        self.deepspeed = _import_deepspeed(dist.device)
        logging.getLogger("DeepSpeed").setLevel(max(logging.getLogger("DeepSpeed").level, logging.WARNING))
        # Wrap the existing torch.distributed group (DeepSpeed does not create its own).
        self.deepspeed.init_distributed(dist_backend=dist.backend, dist_init_required=False, verbose=False)

    # ------------------------------------------------------------------ wrapping
    def _prepare_blocks(self, model: nn.Module, blocks_attr: Optional[str], compile_attrs: tuple[str, ...]) -> None:
        if not (self.cfg.activation_checkpointing or self.cfg.compile):
            return
        compile_blocks = self.cfg.compile
        if compile_blocks and self.cfg.zero_stage == 3:
            # ZeRO-3 gathers each sub-module's parameters in forward hooks that DeepSpeed excludes from
            # compilation (torch.compiler.disable): a block's forward breaks the graph at every sub-module.
            log.warning(
                "engine.compile is skipped with ZeRO stage 3 (DeepSpeed's parameter-gathering hooks break "
                "the graph at every sub-module); use stage 1/2 or FSDP2 for compiled blocks"
            )
            compile_blocks = False
        if compile_blocks and compile_attrs:
            compile_forwards(model, compile_attrs, self.compile_kwargs)
        blocks = block_container(model, blocks_attr)
        warn_skipped_block_options(blocks is not None, self.cfg.activation_checkpointing, compile_blocks, compile_attrs)
        if blocks is None:
            return
        for block in blocks:
            forward = block.forward
            if self.cfg.activation_checkpointing:
                forward = _checkpointed(forward)
            if compile_blocks:
                forward = torch.compile(forward, **self.compile_kwargs)
            block.forward = forward

    def prepare(
        self,
        name: str,
        model: nn.Module,
        optim_cfg: OptimizerConfig,
        ema_decay: Optional[float | Sequence[float]],
        blocks_attr: Optional[str] = "blocks",
        *,
        grad_clip: Optional[float] = None,
        compile_attrs: tuple[str, ...] = (),
    ) -> DeepSpeedPart:
        check_ema_decay(name, ema_decay)
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ValueError(f"{name}: model is already partitioned by DeepSpeed")
        cast_to_fp32_(model)  # fp32 master weights, always
        skeleton = meta_skeleton(model)
        state_keys = [canonical_name(k) for k in model.state_dict().keys()]
        frozen = {
            canonical_name(n): p.detach().float().cpu().clone()
            for n, p in model.named_parameters()
            if not p.requires_grad
        }
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{name}: no trainable parameters")
        model.to(self.dist.device)
        self._prepare_blocks(model, blocks_attr, tuple(compile_attrs))
        opt_device = torch.device("cpu") if self.cfg.offload_optimizer else self.dist.device
        base = build_optimizer([p for p in model.parameters() if p.requires_grad], optim_cfg, opt_device)
        config = ds_config(self.cfg, self.dist.world_size, grad_clip)
        ds_engine, _, _, _ = self.deepspeed.initialize(
            model=model, optimizer=base, config=config, dist_init_required=False
        )
        if self.dist.world_size > 1:
            # DeepSpeed starts every stage from rank 0's weights (broadcast at initialisation): same snapshot.
            box = [frozen]
            tdist.broadcast_object_list(box, src=0)
            frozen = box[0]
        return DeepSpeedPart(
            name,
            ds_engine,
            base,
            ema_decay,
            state_keys,
            frozen,
            self.dist.device,
            self.cfg.zero_stage,
            self.cfg.precision,
            skeleton,
        )

    # ------------------------------------------------------------------ checkpoints
    def _client_state(self, part: DeepSpeedPart) -> dict[str, Any]:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        return {
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
            "llat": {
                "part": part.name,
                "zero_stage": part.stage,
                "precision": part.precision,
                "world_size": self.dist.world_size,
            },
        }

    def save(self, ckpt_dir: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective, synchronous: DeepSpeed checkpoint + gathered EMA per part."""
        ckpt_dir = Path(ckpt_dir)
        for name, part in parts.items():
            assert isinstance(part, DeepSpeedPart), f"{name}: not a DeepSpeed part"
            root = part_dir(ckpt_dir, name)
            part.engine.save_checkpoint(str(root), tag=TAG, client_state=self._client_state(part), save_latest=True)
            emas = [part.full_state_dict(key) for key in part.ema_keys()]
            if self.dist.is_main:
                atomic_torch_save(
                    {
                        "ema": emas[0] if emas else None,
                        # train.ema_decays[1:] (absent in checkpoints from before several EMAs)
                        "emas": {ema_key(i): sd for i, sd in enumerate(emas) if i > 0},
                        "frozen": dict(part.frozen),
                        "meta": {
                            "part": name,
                            "zero_stage": part.stage,
                            "precision": part.precision,
                            "world_size": self.dist.world_size,
                            "state_keys": part.state_keys,
                            "ema_decay": part.ema_decay,
                            "ema_decays": list(part.ema_decays),
                        },
                    },
                    root / EMA_FILE,
                )
        barrier()

    def _convert_to_universal(self, root: Path) -> Path:
        """Collective: make ``root/universal`` from ``root/state`` (rank 0 runs ds_to_universal; others wait)."""
        target = root / UNIVERSAL_TAG
        error: Optional[str] = None
        if self.dist.is_main and not (target / "zero").is_dir():
            for stale in root.glob(".universal-tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f".universal-tmp-{os.getpid()}"
            argv = [
                "--input_folder",
                str(root / TAG),
                "--output_folder",
                str(tmp),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            log.warning(
                "checkpoint %s was written by another number of ranks: converting it to a DeepSpeed "
                "universal checkpoint (python -m deepspeed.checkpoint.ds_to_universal %s)",
                root,
                " ".join(argv),
            )
            try:
                _run_ds_to_universal(argv)
                if not (tmp / "zero").is_dir():
                    raise RuntimeError(f"no {tmp / 'zero'} after the conversion")
            except (Exception, SystemExit) as e:  # noqa: BLE001 - reported on every rank below
                error = f"ds_to_universal failed: {type(e).__name__}: {e}"
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                if target.exists():
                    shutil.rmtree(target)
                os.rename(tmp, target)
                fsync_dir(root)
                # ds_to_universal names its output folder in <root>/latest_universal: point it at the final name.
                (root / "latest_universal").write_text(UNIVERSAL_TAG)
        raise_if_any_rank_failed(f"{root}: {error}" if error else None)
        return target

    def load(self, ckpt_dir: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective. Restore weights, optimizer and EMA of every part, written by any number of ranks (another
        number: through DeepSpeed's universal checkpoint, see the module docstring)."""
        ckpt_dir = Path(ckpt_dir)
        for name, part in parts.items():
            assert isinstance(part, DeepSpeedPart), f"{name}: not a DeepSpeed part"
            root = part_dir(ckpt_dir, name)
            if not (root / TAG).is_dir():
                if (ckpt_dir / "state" / ".metadata").is_file():
                    raise FileNotFoundError(
                        f"{ckpt_dir} was written by the FSDP2 engine (DCP state/), not by DeepSpeed: resume it with "
                        "engine.kind=fsdp2, or export it (tools/export.py) and start from it with model.init_from"
                    )
                raise FileNotFoundError(f"{root / TAG}: no DeepSpeed checkpoint for part {name!r}")
            saved = torch.load(root / EMA_FILE, map_location="cpu", weights_only=False, mmap=True)
            same_world = int(saved["meta"]["world_size"]) == self.dist.world_size
            ds = part.engine
            if same_world:
                path, _ = ds.load_checkpoint(
                    str(root),
                    tag=TAG,
                    load_module_strict=True,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                )
            else:
                self._convert_to_universal(root)
                previous = ds._config.load_universal_checkpoint
                ds._config.load_universal_checkpoint = True
                try:
                    path, _ = ds.load_checkpoint(
                        str(root),
                        tag=UNIVERSAL_TAG,
                        load_module_strict=True,
                        load_optimizer_states=True,
                        load_lr_scheduler_states=False,
                    )
                finally:
                    ds._config.load_universal_checkpoint = previous
            if path is None:
                raise RuntimeError(f"{root}: DeepSpeed could not load the checkpoint (see its warnings above)")
            part.frozen = {k: v.clone() for k, v in saved["frozen"].items()}
            if part.ema is not None:
                if saved["ema"] is None:
                    raise ValueError(f"{root / EMA_FILE}: the checkpoint has no EMA but part {name!r} has one")
                part.load_ema_state_dict(saved["ema"])
                for key in part.ema_keys()[1:]:
                    sd = (saved.get("emas") or {}).get(key)
                    if sd is None:
                        if self.dist.is_main:
                            log.warning(
                                "%s: no %s in the checkpoint: it starts as a copy of the primary EMA", root, key
                            )
                        sd = saved["ema"]
                    part.load_ema_state_dict(sd, key)


# ---------------------------------------------------------------------------------------------------- offline
def consolidated_state_dicts(ckpt_dir: Path, part: str = "model") -> dict[str, dict[str, torch.Tensor]]:
    """Offline (one process, no process group): ``{"model": sd, "ema": sd}`` of ``part`` from a checkpoint
    directory written by this engine, with the model's own key names and order, fp32 CPU tensors.

    ``model``: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (fp32 master weights reassembled from
    every rank's ZeRO partitions, buffers from the model states), with the frozen parameters taken from our
    fp32 snapshot (ZeRO-1 checkpoints do not carry them; bf16 runs hold only bf16 copies). ``ema``: ``ema.pt``
    (absent when the part has no EMA).
    """
    root = part_dir(ckpt_dir, part)
    if not (root / TAG).is_dir() or not (root / EMA_FILE).is_file():
        parts = (
            sorted(p.name for p in (Path(ckpt_dir) / DS_DIR).iterdir()) if (Path(ckpt_dir) / DS_DIR).is_dir() else []
        )
        raise FileNotFoundError(f"{ckpt_dir}: no DeepSpeed checkpoint of part {part!r} (parts found: {parts})")
    _import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"), strict=False)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = torch.load(root / EMA_FILE, map_location="cpu", weights_only=False)
    keys: list[str] = saved["meta"]["state_keys"]
    raw = {canonical_name(k): v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(root), tag=TAG).items()}
    raw.update(saved["frozen"])
    missing = [k for k in keys if k not in raw]
    if missing:
        raise KeyError(f"{root}: the DeepSpeed checkpoint lacks {missing[:10]}")
    model = {k: (raw[k].float() if raw[k].is_floating_point() else raw[k]).detach().contiguous() for k in keys}
    out = {"model": model}
    if saved["ema"] is not None:
        out["ema"] = {k: saved["ema"][k].detach().contiguous() for k in keys}
    for key, sd in (saved.get("emas") or {}).items():  # train.ema_decays[1:]
        out[key] = {k: sd[k].detach().contiguous() for k in keys}
    return out
