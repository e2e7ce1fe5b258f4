"""PyTorch FSDP2 engine: ``fully_shard`` per block + root, fp32 master weights, DCP checkpoints.

Wrapping (``FSDP2Engine.prepare``), in this order:

1. parameters are cast to fp32 (master weights are always fp32);
2. the EMA is a deep copy of that fp32 model taken *before* any wrapping (``requires_grad=False``, eval mode);
3. every block of ``getattr(model, blocks_attr)`` optionally gets activation checkpointing
   (``checkpoint_wrapper``, non-reentrant) and ``torch.compile`` of its ``forward`` (the module object is
   kept, so ``state_dict`` keys do not change; FSDP2's hooks stay outside the compiled region), then
   ``fully_shard(block)``; finally ``fully_shard(model)`` for the remaining (root) parameters;
   ``compile_attrs`` (``PartSpec.compile_attrs``): sub-modules compiled the same way (their ``forward``) *inside*
   a unit, for models without repeated blocks (the VA-VAE autoencoder and discriminator are single units);
4. the EMA is sharded the same way (per block + root, no mixed precision, no checkpointing/compile), so
   each rank's EMA shard lines up element for element with its weight shard and the EMA update is one
   fused op over local shards, with no communication. Several decays (``train.ema_decays``): one such EMA per
   decay (``part.emas``; ``part.ema`` is the first), saved as ``<part>.ema``, ``<part>.ema_1``, ...

Device mesh (``engine.sharding``): ``"full"`` shards every unit over all ranks (1-D mesh ``("shard",)``);
``"hybrid"`` (HSDP) builds a 2-D mesh ``("replicate", "shard")`` of shape (world / G, G) with
G = ``engine.shard_group_size`` (default: the ranks per node, ``LOCAL_WORLD_SIZE``): each unit is sharded within a
group of G consecutive ranks (one node: all-gathers and reduce-scatters stay on NVLink) and replicated across the
groups (one all-reduce of the gradient shards per unit, across nodes). The EMA is sharded on the same mesh, so
its update stays local. DCP stores global tensors, so a checkpoint written under one mesh loads under any other.

Precision (``engine.precision``; master weights, gradient reduction, optimizer and EMA are fp32 in every mode):

* ``"bf16"``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32, cast_forward_inputs=False)`` — FSDP2
  all-gathers and computes with bf16 parameters;
* ``"bf16-autocast"``: no parameter cast (fp32 all-gathers); the forward runs under ``torch.autocast(bf16)``
  (``Engine.autocast``, opened by the trainer around ``Task.loss``), as the official LightningDiT training: matmuls
  in bf16, while fp32 parameters such as ``pos_embed`` keep the residual stream in fp32;
* ``"fp32"``: no cast, no autocast.

Checkpoints (``save``/``load``, both collective): one DCP checkpoint under ``<ckpt_dir>/state`` holding
``{"<part>.model", "<part>.ema", "<part>.optim"}`` for every part as sharded (DTensor) state dicts — DCP
reshards on load, so a checkpoint written by N ranks loads on M ranks. The per-rank ``extra`` state next to it
(``<ckpt_dir>/extra/rank{r:05d}.pt``) is written and read by ``core.checkpoint`` (the same for every engine).

Async save (``async_save=True``): the state is staged to CPU memory synchronously inside ``save`` (training
may change the weights as soon as ``save`` returns); the files are written by a background thread that
communicates over a dedicated gloo process group (created at the first async save, collectively), so it never
interleaves with the training collectives. ``wait()`` blocks until this rank's write has finished and
re-raises its error; it is *not* a collective. A checkpoint is only complete when ``wait()`` has returned on
every rank — the caller (``core.checkpoint.CheckpointManager``) adds the barrier and the commit.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from core.config import EngineConfig, OptimizerConfig
from core.distributed import DistInfo
from core.ema import ema_decay_list, ema_key, ema_update_
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

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FSDP2Part(TrainedPart):
    """A model wrapped with FSDP2 + its optimizer + its (identically sharded) EMA."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        ema: Optional[nn.Module],
        optimizer: torch.optim.Optimizer,
        ema_decay: Optional[float | Sequence[float]],
        grad_clip: Optional[float],
        device: torch.device,
        skeleton: Optional[nn.Module] = None,
        extra_emas: Sequence[nn.Module] = (),
    ):
        super().__init__(name, module, ema, optimizer, ema_decay, device, skeleton)
        self.emas += list(extra_emas)  # train.ema_decays[1:], sharded like `ema`
        if len(self.emas) != len(self.ema_decays):
            raise ValueError(f"{name}: {len(self.emas)} EMA modules for {len(self.ema_decays)} EMA decays")
        self.grad_clip = grad_clip
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        # Every named parameter, frozen ones included (the official EMA averages all of them).
        src = {canonical_name(n): p for n, p in module.named_parameters()}
        self._ema_src: list[torch.Tensor] = list(src.values())
        self._ema_dsts: list[list[torch.Tensor]] = []  # per EMA, in the order of _ema_src
        for e in self.emas:
            dst = {canonical_name(n): p for n, p in e.named_parameters()}
            if src.keys() != dst.keys():
                raise RuntimeError(f"{name}: EMA and model parameters differ: {sorted(src.keys() ^ dst.keys())[:10]}")
            # DTensor parameters; ema_update_ works on their local shards, which line up because
            # FSDP2 shards both modules identically (same shapes, same mesh).
            self._ema_dsts.append([dst[key] for key in src])

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self.module.set_requires_gradient_sync(sync)
        loss.backward()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (sharded) gradients, as a plain 0-dim tensor identical on every rank."""
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        return total

    @property
    def skips_on_device(self) -> bool:
        """Whether a non-finite step is skipped on the device (no host read): the optimizer is a fused one (the
        default on CUDA), whose kernel takes a ``found_inf`` flag as ``torch.amp.GradScaler`` uses it."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False)) and all(
            g.get("fused") for g in self.optimizer.param_groups
        )

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Clip, optimizer step, zero grad, EMA update; returns the pre-clip global grad norm.

        If the norm is not finite (NaN/inf gradients), *nothing* is updated — weights, optimizer moments and step
        count, EMA stay as they were — the gradients are dropped, and the non-finite norm is returned so the caller
        can count the skipped step. The norm is all-reduced, so every rank takes the same decision.

        With a fused optimizer (``skips_on_device``) the decision is made on the device, with no host read: the
        flag ``found_inf = ~isfinite(norm)`` goes to the fused kernel (which leaves parameters, moments and step
        untouched when it is set, exactly as under ``GradScaler``) and gates the EMA (``ema_update_(apply=)``); the
        clipping multiply runs either way (on a skipped step it only scales gradients that are then dropped). On a
        finite step the kernels and their inputs are those of the unconditional update, so the weights are the same
        bits. Other optimizers (foreach: the default on the CPU) cannot skip on the device (their step count lives
        on the host): the norm is read on the host, as before.
        """
        norm = self.grad_norm()
        finite = None
        if self.skips_on_device:
            finite = torch.isfinite(norm)
        elif not bool(torch.isfinite(norm)):  # host read (non-fused optimizers only)
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        if self.grad_clip is not None:
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            local = [_local(p.grad) for p in self.trainable if p.grad is not None]
            if local:
                torch._foreach_mul_(local, coef.to(local[0].device))
        if finite is None:
            self.optimizer.step()
        else:
            # Read by torch's fused Adam/AdamW step (getattr(self, "found_inf")); removed right after.
            self.optimizer.found_inf = (~finite).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        for dst, decay in zip(self._ema_dsts, self.ema_decays):
            ema_update_(dst, self._ema_src, decay, apply=finite)
        return norm

    def set_reshard_after_forward(self, reshard: bool) -> None:
        """FSDP2's ``set_reshard_after_forward`` on the part's root unit (its parameters outside the blocks; the
        whole model for ``blocks_attr=None``): with False they stay unsharded from its forward to its backward."""
        if getattr(self, "_reshard_after_forward", None) is not reshard:
            self.module.set_reshard_after_forward(bool(reshard), recurse=False)
            self._reshard_after_forward = bool(reshard)

    @torch.no_grad()
    def full_state_dict(self, which: str = "model", rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Collective (all-gathers every unit): the full fp32 state dict on the CPU, the model's own key names."""
        module = self.module if which == "model" else self.ema_module(which)
        # cpu_offload=True: only rank 0 gets the tensors; else every rank gets them on its device.
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))
        if rank0_only and tdist.is_initialized() and tdist.get_rank() != 0:
            return {}
        # Copies, never the live tensors: on the CPU the state dict holds the module's own buffers (and, on one
        # rank, parameter storage), which .cpu() would not copy.
        own = self.device.type == "cpu"
        return {canonical_name(k): v.detach().clone() if own else v.detach().cpu() for k, v in sd.items()}


class FSDP2Engine(Engine):
    """FSDP2 wrapping + DCP checkpoints. See the module docstring.

    ``async_save``: write checkpoints from a background thread (``save`` returns after staging to CPU).
    ``compile_kwargs``: keyword arguments for ``torch.compile`` when ``cfg.compile`` (e.g. a backend).
    """

    supports_async_save = True

    def __init__(
        self,
        cfg: EngineConfig,
        dist: DistInfo,
        async_save: bool = False,
        compile_kwargs: Optional[dict[str, Any]] = None,
    ):
        super().__init__(cfg, dist)
        self.async_save = bool(async_save)
        self.compile_kwargs = dict(compile_kwargs or {})
        self._mesh = None
        self._async_pg = None
        self._pending: Optional[Future] = None
        self._pending_dir: Optional[Path] = None

    # ------------------------------------------------------------------ wrapping
    @property
    def mesh(self) -> DeviceMesh:
        """The device mesh every part is sharded on (built at the first ``prepare``; collective)."""
        if self._mesh is None:
            device, world = self.dist.device.type, self.dist.world_size
            if self.cfg.sharding == "full":
                self._mesh = init_device_mesh(device, (world,), mesh_dim_names=("shard",))
            elif self.cfg.sharding == "hybrid":
                group = self.shard_group_size()
                self._mesh = init_device_mesh(device, (world // group, group), mesh_dim_names=("replicate", "shard"))
                if self.dist.is_main:
                    log.info("hybrid sharding: %d replica(s) x %d shard(s)", world // group, group)
            else:
                raise ValueError(
                    f"engine.sharding: unknown sharding {self.cfg.sharding!r} (expected 'full' or 'hybrid')"
                )
        return self._mesh

    def shard_group_size(self) -> int:
        """Hybrid sharding: ranks per shard group (``engine.shard_group_size``, default the ranks per node).

        Collective when defaulted: every rank must build the same mesh, so the ranks per node must agree."""
        world, group = self.dist.world_size, self.cfg.shard_group_size
        key = "engine.shard_group_size"
        if group is None:
            group, key = self.dist.local_world_size, "engine.shard_group_size (null: ranks per node, LOCAL_WORLD_SIZE)"
            if world > 1:
                bounds = torch.tensor([group, -group], device=self.dist.device)
                tdist.all_reduce(bounds, op=tdist.ReduceOp.MAX)
                most, fewest = int(bounds[0]), -int(bounds[1])
                if most != fewest:
                    raise ValueError(
                        f"{key}: the nodes run different numbers of ranks ({fewest} to {most}); "
                        "set engine.shard_group_size explicitly"
                    )
        if group < 1 or world % group:
            raise ValueError(
                f"{key}: world size {world} is not divisible by shard_group_size {group} (hybrid "
                "sharding replicates whole shard groups)"
            )
        return group

    def mp_policy(self) -> MixedPrecisionPolicy:
        if self.cfg.precision == "bf16":
            # cast_forward_inputs=False: FSDP would otherwise round every floating input of every block to
            # bf16 — the raw timestep t and the RoPE tables included, which the official autocast keeps in
            # fp32. The model casts activations to its weight dtype itself.
            return MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        if self.cfg.precision in ("fp32", "bf16-autocast"):
            return MixedPrecisionPolicy()  # fp32 parameters; bf16-autocast casts per op (Engine.autocast)
        raise ValueError(
            f"engine.precision: unknown precision {self.cfg.precision!r} (expected 'bf16', 'bf16-autocast' or 'fp32')"
        )

    def _shard(
        self,
        model: nn.Module,
        blocks_attr: Optional[str],
        mp: MixedPrecisionPolicy,
        checkpointing: bool,
        compile_blocks: bool,
        compile_attrs: tuple[str, ...] = (),
    ) -> None:
        blocks = block_container(model, blocks_attr)
        warn_skipped_block_options(blocks is not None, checkpointing, compile_blocks, compile_attrs)
        if compile_blocks and compile_attrs:
            compile_forwards(model, compile_attrs, self.compile_kwargs)
        kw = dict(mesh=self.mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        for i in range(len(blocks) if blocks is not None else 0):
            block = blocks[i]
            if checkpointing:
                block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                blocks[i] = block
            if compile_blocks:
                # Compile the block's forward in place: same module object, same state_dict keys
                # (torch.compile(block) would add an `_orig_mod.` level); FSDP2 hooks stay uncompiled.
                block.forward = torch.compile(block.forward, **self.compile_kwargs)
            fully_shard(block, **kw)
        fully_shard(model, **kw)

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
    ) -> FSDP2Part:
        if isinstance(model, FSDPModule):
            raise ValueError(f"{name}: model is already wrapped with fully_shard")
        check_ema_decay(name, ema_decay)
        cast_to_fp32_(model)  # fp32 master weights, always
        skeleton = meta_skeleton(model)
        emas = []
        for _ in ema_decay_list(ema_decay):  # one EMA per decay (train.ema_decays), each a copy of the fp32 model
            ema = copy.deepcopy(model)
            ema.requires_grad_(False)
            ema.eval()
            emas.append(ema)
        device = self.dist.device
        model.to(device)
        self._shard(
            model,
            blocks_attr,
            self.mp_policy(),
            self.cfg.activation_checkpointing,
            self.cfg.compile,
            tuple(compile_attrs),
        )
        for ema in emas:
            ema.to(device)
            self._shard(ema, blocks_attr, MixedPrecisionPolicy(), False, False)
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], optim_cfg, device)
        return FSDP2Part(
            name, model, emas[0] if emas else None, optimizer, ema_decay, grad_clip, device, skeleton, emas[1:]
        )

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _state_dict(parts: dict[str, TrainedPart]) -> dict[str, Any]:
        """Sharded (DTensor) state of every part, keyed ``<name>.model/.ema/.ema_<i>/.optim`` (collective-free)."""
        state: dict[str, Any] = {}
        for name, part in parts.items():
            assert isinstance(part, FSDP2Part), f"{name}: not an FSDP2 part"
            msd, osd = get_state_dict(part.module, part.optimizer, options=StateDictOptions())
            state[f"{name}.model"] = msd
            state[f"{name}.optim"] = osd
            for i, ema in enumerate(part.emas):
                state[f"{name}.{ema_key(i)}"] = get_model_state_dict(ema, options=StateDictOptions())
        return state

    def _async_group(self):
        if self._async_pg is None:
            # Collective (every rank calls save); a CPU group of its own for the writer thread.
            self._async_pg = tdist.new_group(backend="gloo")
        return self._async_pg

    def save(self, ckpt_dir: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective. Sync: returns when this rank's files are written. Async: returns after staging."""
        self.wait()
        ckpt_dir = Path(ckpt_dir)
        # get_state_dict initialises empty optimizer state with a zero-lr step; undo that for the live run.
        fresh = [p.optimizer for p in parts.values() if isinstance(p, FSDP2Part) and not p.optimizer.state]
        state = self._state_dict(parts)
        target = str(ckpt_dir / "state")
        try:
            if self.async_save:
                self._pending = dcp.async_save(state, checkpoint_id=target, process_group=self._async_group())
                self._pending_dir = ckpt_dir
            else:
                dcp.save(state, checkpoint_id=target)
        finally:
            for opt in fresh:
                opt.state.clear()

    def wait(self) -> None:
        """Block until this rank's async write (if any) is done; re-raise its error. Not a collective."""
        pending, self._pending, self._pending_dir = self._pending, None, None
        if pending is not None:
            pending.result()

    def pending_done(self) -> bool:
        """Whether this rank has no async write in flight (non-blocking)."""
        return self._pending is None or self._pending.done()

    def load(self, ckpt_dir: Path, parts: dict[str, TrainedPart]) -> None:
        """Collective. Restore model, EMAs and optimizer of every part (written by any number of ranks).

        An EMA the checkpoint lacks (``train.ema_decays`` grew since it was written, e.g. a checkpoint from before
        several EMAs) starts as a copy of the part's primary EMA, with a warning; the primary EMA must be there."""
        self.wait()
        ckpt_dir = Path(ckpt_dir)
        state = self._state_dict(parts)
        saved = _saved_entries(ckpt_dir / "state")
        added = {
            f"{name}.{ema_key(i)}"
            for name, part in parts.items()
            for i in range(1, len(part.emas))
            if f"{name}.{ema_key(i)}" not in saved
        }
        for key in sorted(added):
            log.warning("%s: no %s in the checkpoint: it starts as a copy of the primary EMA", ckpt_dir, key)
            del state[key]
        dcp.load(state, checkpoint_id=str(ckpt_dir / "state"))
        for name, part in parts.items():
            set_state_dict(
                part.module,
                part.optimizer,
                model_state_dict=state[f"{name}.model"],
                optim_state_dict=state[f"{name}.optim"],
                options=StateDictOptions(),
            )
            for i, ema in enumerate(part.emas):
                key = f"{name}.{ema_key(i)}"
                if key in added:
                    with torch.no_grad():
                        for dst, src in zip(ema.parameters(), part.ema.parameters()):
                            _local(dst).copy_(_local(src))
                else:
                    set_model_state_dict(ema, state[key], options=StateDictOptions())


def _saved_entries(dcp_dir: Path) -> set[str]:
    """The top-level entries (``<part>.model``, ``<part>.ema_1``, ...) of the DCP checkpoint in ``dcp_dir``, plus
    every dotted prefix of its flattened keys (enough to ask whether an entry is there)."""
    metadata = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    planner_data = metadata.planner_data or {}
    tops: set[str] = set()
    for key in metadata.state_dict_metadata:
        path = planner_data.get(key)
        if path:
            tops.add(str(path[0]))
        pieces = key.split(".")
        tops.update(".".join(pieces[:n]) for n in range(1, len(pieces)))
    return tops
