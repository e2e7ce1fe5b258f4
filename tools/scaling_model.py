"""Scaling model: step time, MFU, memory per GPU and time to 800 epochs for LightningDiT training under DDP,
ZeRO-1/2/3, FSDP2 full sharding and FSDP2 hybrid sharding (HSDP: shard within a node, replicate across nodes;
"-NR" = ``engine.reshard_after_forward=false``, no backward re-gather), on N nodes of 8 GPUs.

    python tools/scaling_model.py                                   # XL/1 + 1p6B/1 at 1/8/16/64 nodes (defaults)
    python tools/scaling_model.py --img-s 612 --at-batch 128 --mem-gib 71     # from a bench_train measurement
    python tools/scaling_model.py --markdown                        # the tables of docs/scaling.md

Inputs: ONE measured single-GPU training step of XL/1 (throughput and peak memory at a batch size, from
``tools/bench_train.py``); until that measurement exists the defaults are the issue's figures and are
ASSUMPTIONS (documented in docs/scaling.md): 446 img/s at batch 64 (the compiled headroom probe on one H100),
48 GiB peak memory at batch 64 (about 0.48 GiB of activations per image; the official step OOMs at 128).
Everything else is computed: parameter counts and FLOPs from the model registry, the bytes of every collective
from the strategy's sharding (the FSDP2 formulas are checked against a real 2-rank gloo step in
tests/integration/test_perf_tools_distributed.py), and their time from an alpha-beta ring/tree model of NCCL. See
docs/scaling.md for every assumption and the recommendation.

Library use (tests): ``fsdp_units(model)``, ``fsdp_step_collectives(...)``, ``ddp_step_collectives(...)``
return the exact collectives (op, elements, bytes per element, group) of one training step.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

GiB = 2**30
IMAGENET_TRAIN = 1_281_167  # ImageNet-1k train images
EPOCHS = 800
GLOBAL_BATCH = 1024


# ================================================================================================ collectives
@dataclass(frozen=True)
class Collective:
    """One collective call. ``numel`` is the full (unsharded, padded) message: the all-gather output, the
    reduce-scatter input, the all-reduce buffer. ``group`` names the process group it runs on."""

    op: str  # "all_gather" | "reduce_scatter" | "all_reduce"
    numel: int
    elem_bytes: int
    group: str = "world"  # "world" | "shard" | "replicate"
    phase: str = ""  # "forward" | "backward" | "step"

    @property
    def nbytes(self) -> int:
        return self.numel * self.elem_bytes

    def wire_bytes(self, ranks: int) -> float:
        """Bytes each rank sends with the ring algorithm: (r-1)/r * S for all-gather / reduce-scatter,
        2 (r-1)/r * S for all-reduce (reduce-scatter + all-gather)."""
        if ranks <= 1:
            return 0.0
        factor = 2.0 if self.op == "all_reduce" else 1.0
        return factor * (ranks - 1) / ranks * self.nbytes


def padded_numel(shape: Sequence[int], shard: int) -> int:
    """Elements FSDP2 communicates for one parameter sharded ``shard`` ways: dim 0 padded to a multiple of
    ``shard`` (a 0-dim parameter counts as one element)."""
    if len(shape) == 0:
        return shard * math.ceil(1 / shard)
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / shard) * shard * rest


@dataclass
class Unit:
    """One FSDP unit (a ``fully_shard``ed module): its parameters' shapes and which of them train."""

    name: str
    shapes: list[tuple[int, ...]]
    trainable: list[bool]

    def numel(self, shard: int = 1, trainable_only: bool = False) -> int:
        return sum(padded_numel(s, shard) for s, t in zip(self.shapes, self.trainable) if t or not trainable_only)


def fsdp_units(model, blocks_attr: Optional[str] = "blocks") -> list[Unit]:
    """The units the FSDP2 engine creates: one per block of ``model.<blocks_attr>`` (in order), then the root
    with every remaining parameter (core/engines/fsdp2.py)."""
    units, seen = [], set()
    blocks = model.get_submodule(blocks_attr) if blocks_attr else []
    for i, block in enumerate(blocks):
        params = list(block.parameters())
        seen.update(id(p) for p in params)
        units.append(Unit(f"{blocks_attr}.{i}", [tuple(p.shape) for p in params], [p.requires_grad for p in params]))
    rest = [p for p in model.parameters() if id(p) not in seen]
    units.append(Unit("root", [tuple(p.shape) for p in rest], [p.requires_grad for p in rest]))
    return units


def fsdp_step_collectives(
    units: list[Unit],
    shard: int,
    replicate: int = 1,
    *,
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    micro_batches: int = 1,
    reshard_after_forward: bool = True,
    grad_norm: bool = True,
) -> list[Collective]:
    """The collectives of one optimizer step of the FSDP2 engine (fully_shard per unit on a
    ``(replicate, shard)`` mesh; ``replicate == 1`` is full sharding).

    Per micro-batch: an all-gather of every unit in forward (bf16: ``param_bytes``; frozen parameters included)
    and, with ``reshard_after_forward`` (the engine passes True explicitly, so FSDP2 reshards the root too),
    again in backward. On the last micro-batch only (``set_requires_gradient_sync(False)`` before): a
    reduce-scatter per unit of its trainable gradients (``reduce_bytes``; fp32) on the shard group, then
    an all-reduce of the shard (numel / shard) across the replicate group. Shard-group collectives of a
    group of size 1 are not issued (FSDP2 skips them). ``grad_norm``: the engine's global gradient norm
    (``torch.nn.utils.get_total_norm`` on DTensor gradients) all-reduces one fp32 value per gradient tensor.
    """
    out: list[Collective] = []
    for m in range(micro_batches):
        last = m == micro_batches - 1
        if shard > 1:
            out += [Collective("all_gather", u.numel(shard), param_bytes, "shard", "forward") for u in units]
            if reshard_after_forward:
                out += [
                    Collective("all_gather", u.numel(shard), param_bytes, "shard", "backward") for u in reversed(units)
                ]
        if last:
            for u in reversed(units):
                if shard > 1:
                    out.append(Collective("reduce_scatter", u.numel(shard, True), reduce_bytes, "shard", "backward"))
                if replicate > 1:
                    out.append(
                        Collective("all_reduce", u.numel(shard, True) // shard, reduce_bytes, "replicate", "backward")
                    )
    if grad_norm:
        tensors = sum(sum(u.trainable) for u in units)
        out.append(Collective("all_reduce", tensors, 4, "world", "step"))
    return out


def ddp_step_collectives(trainable_numel: int, grad_bytes: int = 4) -> list[Collective]:
    """DDP: the gradients are all-reduced once per step (in buckets; their sizes add up to every trainable
    element). Returned as one collective of the total size."""
    return [Collective("all_reduce", trainable_numel, grad_bytes, "world", "backward")]


# ================================================================================================ hardware
@dataclass
class Cluster:
    """8-GPU nodes (defaults: H800 SXM, NVLink 400 GB/s, 8 x 400 Gb/s InfiniBand per node). NCCL-style
    alpha-beta model; see docs/scaling.md for the sources of each number."""

    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16 per GPU (vendor; H800 = H100 SXM compute)
    hbm_gib: float = 80.0
    hbm_tbs: float = 3.35  # HBM3 bandwidth, for the optimizer + EMA pass
    hbm_eff: float = 0.8
    nvlink_gbs: float = 400.0  # vendor figure: both directions together -> 200 GB/s each way
    nic_gbits: float = 400.0  # one 400 Gb/s NIC per GPU
    link_eff: float = 0.8  # achieved / nominal bus bandwidth (NCCL busBW)
    lat_base_us: float = 8.4  # NCCL tuning model, Simple protocol: per-collective base latency
    lat_nvlink_us: float = 3.4  # per intra-node ring step
    lat_net_us: float = 9.6  # per inter-node ring step

    @property
    def nvlink_Bps(self) -> float:  # one direction, achieved
        return self.nvlink_gbs / 2 * 1e9 * self.link_eff

    @property
    def nic_Bps(self) -> float:  # one NIC, one direction, achieved
        return self.nic_gbits / 8 * 1e9 * self.link_eff


@dataclass(frozen=True)
class Group:
    ranks: int
    nodes: int

    @property
    def per_node(self) -> int:
        return max(1, self.ranks // self.nodes)


def bus_bandwidth(group: Group, cl: Cluster) -> float:
    """Bytes/s of the slowest hop of a ring over ``group``: NVLink inside a node; across nodes the ring's
    per-node inter-node traffic equals a rank's traffic, carried by the node's ``per_node`` NICs (one per GPU,
    rail-aligned), so bw = min(NVLink, per_node * NIC); one rank per node: that rank's NIC."""
    if group.nodes <= 1:
        return cl.nvlink_Bps
    if group.per_node == 1:
        return cl.nic_Bps
    return min(cl.nvlink_Bps, group.per_node * cl.nic_Bps)


def collective_time(op: str, nbytes: float, group: Group, cl: Cluster) -> float:
    """Seconds for one collective of ``nbytes`` (full message) on ``group``.

    Ring (all ops): latency base + (steps - inter) * lat_nvlink + inter * lat_net with steps = r-1
    (all-gather, reduce-scatter) or 2(r-1) (all-reduce) and inter = n-1 or 2(n-1) the steps that cross nodes
    (NCCL's tuning model), plus (r-1)/r * S / bw (times 2 for all-reduce). Tree (all-reduce only, across
    nodes): latency base + 2 ((g-1) lat_nvlink + ceil(log2 n) lat_net), bandwidth term 2 S / (0.9 bw) (NCCL
    derates tree bandwidth); the cheaper of the two is used, as NCCL's tuner does."""
    r, n = group.ranks, group.nodes
    if r <= 1 or nbytes <= 0:
        return 0.0
    bw = bus_bandwidth(group, cl)
    k = 2 if op == "all_reduce" else 1
    steps, inter = k * (r - 1), k * (n - 1)
    ring = (cl.lat_base_us + (steps - inter) * cl.lat_nvlink_us + inter * cl.lat_net_us) * 1e-6 + k * (
        r - 1
    ) / r * nbytes / bw
    if op != "all_reduce" or n <= 1:
        return ring
    tree = (
        cl.lat_base_us + 2 * ((group.per_node - 1) * cl.lat_nvlink_us + math.ceil(math.log2(n)) * cl.lat_net_us)
    ) * 1e-6 + 2 * nbytes / (0.9 * bw)
    return min(ring, tree)


# ================================================================================================ workload
@dataclass
class ModelSpec:
    name: str
    params: int  # all parameters (frozen pos_embed included)
    trainable: int
    depth: int
    width: int
    train_flops: int  # per image, fwd + bwd (flops_per_image(training=True))

    @property
    def root_params(self) -> int:  # everything outside the blocks (patch/t/y embedders, final layer)
        return self.params - self.depth * self.block_params

    block_params: int = 0


def model_spec(name: str) -> ModelSpec:
    """Counts from the real registry model (built on the meta device: no memory, no weights)."""
    # lazy: --help and the formula tables answer without torch; only the registry models' counts need it
    import torch

    from models.lightningdit import ModelConfig, build_model

    with torch.device("meta"):
        m = build_model(ModelConfig(type=name))
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    block = sum(p.numel() for p in m.blocks[0].parameters())
    return ModelSpec(
        name, total, trainable, m.depth, m.hidden_size, m.flops_per_image(training=True), block_params=block
    )


@dataclass
class Measured:
    """One measured single-GPU training step of the reference model (defaults: the issue's figures = ASSUMPTIONS)."""

    img_s: float = 446.0  # compiled headroom probe, one H100, XL/1
    at_batch: int = 64
    mem_gib: float = 48.0  # peak memory at that batch (assumed: 22 B/param static + ~0.48 GiB/img)
    model: str = "LightningDiT-XL/1"
    micro_overhead_ms: float = 2.0  # per micro-batch fixed cost (launches, small kernels): assumed
    overhead_gib: float = 3.0  # CUDA context, NCCL buffers, allocator slack: assumed


@dataclass
class Knobs:
    param_bytes: int = 2  # all-gathered parameters (bf16)
    grad_bytes: int = 4  # gradient reductions (fp32, as the FSDP2 engine's reduce_dtype)
    overlap_slowdown: float = 0.05  # compute slowdown while NCCL kernels run alongside (SM/HBM contention)
    zero3_slowdown: float = 0.15  # the same for DeepSpeed ZeRO-3 (coarser prefetch, host-side bookkeeping)
    ddp_bucket_mb: float = 25.0  # torch DDP bucket_cap_mb
    zero_bucket_elems: int = 500_000_000  # DeepSpeed reduce/allgather bucket (EngineConfig.bucket_size)
    opt_bytes_per_param: int = 44  # fused AdamW 28 + EMA lerp 12 + grad-norm read 4 (HBM traffic)
    mem_headroom: float = 0.95  # usable fraction of HBM


STRATEGIES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2-full", "FSDP2-HSDP", "FSDP2-HSDP-NR")


@dataclass
class Row:
    model: str
    nodes: int
    gpus: int
    strategy: str
    per_gpu: int
    micro: int
    accum: int
    mem_gib: float
    comm_gb: float  # ring wire bytes sent per GPU per step
    ib_gb_node: float  # bytes leaving each node per step over InfiniBand
    exposed_ms: float  # step time not covered by compute
    step_ms: float
    img_s_gpu: float
    mfu: float
    days_800ep: float
    fits: bool = True
    notes: str = ""


class Calibration:
    """Per-image compute time and activation memory of a model, from the one measured step."""

    def __init__(self, meas: Measured, ref: ModelSpec, cl: Cluster, knobs: Knobs):
        self.meas, self.ref, self.cl, self.knobs = meas, ref, cl, knobs
        t_step = meas.at_batch / meas.img_s
        t_opt = self.optimizer_time(ref.params, 1)
        self.t_img_ref = (t_step - meas.micro_overhead_ms * 1e-3 - t_opt) / meas.at_batch
        if self.t_img_ref <= 0:
            raise ValueError("measured step is shorter than the modelled optimizer + overhead time")
        static = 22 * ref.params / GiB  # fp32 weights+grads+Adam+EMA (20 B) + bf16 compute copies (2 B)
        self.act_ref = (meas.mem_gib - static - meas.overhead_gib) / meas.at_batch * GiB
        if self.act_ref <= 0:
            raise ValueError("measured peak memory is below the modelled static memory")

    def optimizer_time(self, params: float, shards: int) -> float:
        return self.knobs.opt_bytes_per_param * params / shards / (self.cl.hbm_tbs * 1e12 * self.cl.hbm_eff)

    def t_img(self, spec: ModelSpec) -> float:
        """Same achieved FLOP/s as the measured model (scaled by the FLOP ratio)."""
        return self.t_img_ref * spec.train_flops / self.ref.train_flops

    def act_bytes(self, spec: ModelSpec) -> float:
        """Activations scale with depth x width (same tokens per image)."""
        return self.act_ref * (spec.depth * spec.width) / (self.ref.depth * self.ref.width)

    def micro_time(self, spec: ModelSpec, batch: int) -> float:
        return self.meas.micro_overhead_ms * 1e-3 + batch * self.t_img(spec)


def pipeline(n: int, compute: float, comm: float) -> float:
    """n stages, each with ``compute`` seconds of compute and ``comm`` seconds of communication overlapped with
    the neighbouring stage (prefetch / bucketed reduction): the slower stream sets the pace, one stage of the
    other is exposed."""
    if n <= 0:
        return 0.0
    return max(n * compute + comm, compute + n * comm)


def memory_bytes(
    strategy: str, spec: ModelSpec, micro: int, accum: int, nodes: int, cal: Calibration, knobs: Knobs, cl: Cluster
) -> float:
    P, W, G = spec.params, nodes * cl.gpus_per_node, cl.gpus_per_node
    unit = max(spec.block_params, spec.root_params)
    act = micro * cal.act_bytes(spec)
    base = cal.meas.overhead_gib * GiB + act
    if strategy == "DDP":
        return base + (4 + 4 + 8 + 4 + 2) * P
    if strategy == "ZeRO-1":
        return base + (4 + 4 + 2) * P + 12 * P / W
    if strategy == "ZeRO-2":
        bucket = 2 * min(knobs.zero_bucket_elems, P) * 2
        return base + (4 + 2) * P + 16 * P / W + bucket
    shards = G if strategy.startswith("FSDP2-HSDP") else W
    mem = base + 20 * P / shards + 2 * 2 * unit + 2 * 4 * unit  # 2 units in flight: bf16 params, fp32 grads
    if strategy.endswith("-NR"):
        mem += 2 * P  # reshard_after_forward=False: unsharded bf16 parameters kept from forward to backward
    if accum > 1 and strategy != "ZeRO-3":
        mem += 4 * P  # FSDP2 keeps unsharded fp32 gradients between micro-batches (no-sync)
    return mem


def step_time(
    strategy: str, spec: ModelSpec, micro: int, accum: int, nodes: int, cal: Calibration, knobs: Knobs, cl: Cluster
) -> tuple[float, float, float, float]:
    """(step seconds, exposed communication seconds, wire GB per GPU, IB GB per node) of one optimizer step."""
    G = cl.gpus_per_node
    W = nodes * G
    world, node, repl = Group(W, nodes), Group(G, 1), Group(nodes, nodes)
    P, Pt = spec.params, spec.trainable
    c = cal.micro_time(spec, micro)
    c_f, c_b = c / 3, 2 * c / 3
    k = 1 + knobs.overlap_slowdown
    compute = accum * c
    gb, pb = knobs.grad_bytes, knobs.param_bytes
    L = spec.depth + 1  # FSDP units: blocks + root
    unit_p = P / L
    wire = ib = 0.0

    def ib_bytes(op_bytes_wire: float, group: Group) -> float:
        """Per-node inter-node traffic of a collective whose per-rank wire bytes are ``op_bytes_wire``."""
        if group.nodes <= 1:
            return 0.0
        return op_bytes_wire * (1 if group.per_node > 1 else G)  # ring: node exit = one rank's traffic

    if strategy in ("DDP", "ZeRO-1", "ZeRO-2"):
        bucket_bytes = knobs.ddp_bucket_mb * 2**20 if strategy == "DDP" else knobs.zero_bucket_elems * gb
        n_b = max(1, math.ceil(Pt * gb / bucket_bytes))
        op = "all_reduce" if strategy == "DDP" else "reduce_scatter"
        per_bucket = collective_time(op, Pt * gb / n_b, world, cl)
        reduced = accum if strategy == "ZeRO-2" else 1  # ZeRO-2 cannot keep full gradients
        t = (accum - reduced) * c + reduced * (c_f + pipeline(n_b, k * c_b / n_b, per_bucket))
        w = Collective(op, Pt, gb).wire_bytes(W) * reduced
        if strategy != "DDP":  # updated parameters, after the step: exposed
            n_ag = max(1, math.ceil(P / knobs.zero_bucket_elems))
            t += n_ag * collective_time("all_gather", P * pb / n_ag, world, cl)
            w += Collective("all_gather", P, pb).wire_bytes(W)
            t += cal.optimizer_time(P, W)
        else:
            t += cal.optimizer_time(P, 1)
        wire, ib = w, ib_bytes(w, world)
    else:
        hsdp = strategy.startswith("FSDP2-HSDP")
        no_reshard = strategy.endswith("-NR")
        sg = node if hsdp else world
        kk = 1 + (knobs.zero3_slowdown if strategy == "ZeRO-3" else knobs.overlap_slowdown)
        ag = collective_time("all_gather", unit_p * pb, sg, cl)
        rs = collective_time("reduce_scatter", unit_p * gb, sg, cl)
        ar = collective_time("all_reduce", unit_p * gb / G, repl, cl) if hsdp else 0.0
        fwd = pipeline(L, kk * c_f / L, ag)
        ag_b = 0.0 if no_reshard else ag  # backward re-gather (reshard_after_forward)
        bwd_plain = pipeline(L, kk * c_b / L, ag_b)
        # HSDP: the inter-node all-reduce (InfiniBand) runs beside the intra-node collectives (NVLink).
        bwd_sync = pipeline(L, kk * c_b / L, max(ag_b + rs, ar))
        reduced = accum if strategy == "ZeRO-3" else 1  # FSDP2: no-sync until the last micro-batch
        t = accum * fwd + (accum - reduced) * bwd_plain + reduced * bwd_sync
        t += cal.optimizer_time(P, G if hsdp else W)
        w_sg = (1 if no_reshard else 2) * accum * Collective("all_gather", P, pb).wire_bytes(
            sg.ranks
        ) + reduced * Collective("reduce_scatter", Pt, gb).wire_bytes(sg.ranks)
        w_ar = reduced * Collective("all_reduce", Pt / G, gb).wire_bytes(nodes) if hsdp else 0.0
        wire = w_sg + w_ar
        ib = ib_bytes(w_sg, sg) + (G * w_ar if hsdp and nodes > 1 else 0.0)
    exposed = max(0.0, t - compute)
    return t, exposed, wire / 1e9, ib / 1e9


def evaluate(
    spec: ModelSpec,
    nodes: int,
    strategy: str,
    cal: Calibration,
    knobs: Knobs,
    cl: Cluster,
    global_batch: int = GLOBAL_BATCH,
) -> Optional[Row]:
    W = nodes * cl.gpus_per_node
    if strategy == "FSDP2-HSDP" and nodes == 1:
        return None  # = FSDP2-full on one node (HSDP-NR: full, no reshard)
    if global_batch % W:
        raise ValueError(f"global batch {global_batch} is not divisible by {W} GPUs")
    per_gpu = global_batch // W
    limit = cl.hbm_gib * GiB * knobs.mem_headroom
    micro = per_gpu
    while micro >= 1:
        accum = per_gpu // micro
        if per_gpu % micro == 0 and memory_bytes(strategy, spec, micro, accum, nodes, cal, knobs, cl) <= limit:
            break
        micro -= 1
    fits = micro >= 1
    if not fits:
        micro, accum = 1, per_gpu
    mem = memory_bytes(strategy, spec, micro, accum, nodes, cal, knobs, cl)
    t, exposed, wire, ib = step_time(strategy, spec, micro, accum, nodes, cal, knobs, cl)
    img_s = per_gpu / t
    steps = EPOCHS * (IMAGENET_TRAIN // global_batch)
    return Row(
        spec.name,
        nodes,
        W,
        strategy,
        per_gpu,
        micro,
        accum,
        mem / GiB,
        wire,
        ib,
        exposed * 1e3,
        t * 1e3,
        img_s,
        img_s * spec.train_flops / (cl.peak_tflops * 1e12),
        steps * t / 86400,
        fits,
    )


PREFERENCE = ("FSDP2-full", "FSDP2-HSDP", "FSDP2-HSDP-NR", "ZeRO-1", "ZeRO-2", "DDP", "ZeRO-3")


def recommend(rows: list[Row], tie: float = 0.03) -> dict[tuple[str, int], Row]:
    """Per (model, nodes): among the strategies that fit in memory and are within ``tie`` (3%, below the
    model's accuracy) of the fastest, the first in PREFERENCE (our FSDP2 engine and its simplest setting
    first, then less memory)."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.fits:
            groups.setdefault((r.model, r.nodes), []).append(r)
    best = {}
    for key, rs in groups.items():
        fastest = min(r.step_ms for r in rs)
        near = [r for r in rs if r.step_ms <= fastest * (1 + tie)]
        best[key] = min(near, key=lambda r: PREFERENCE.index(r.strategy))
    return best


# ================================================================================================ output
COLUMNS = [
    ("model", "model"),
    ("nodes", "nodes"),
    ("GPUs", "gpus"),
    ("strategy", "strategy"),
    ("b/GPU", "per_gpu"),
    ("micro x acc", None),
    ("mem GiB", "mem_gib"),
    ("fits", None),
    ("sent GB/GPU", "comm_gb"),
    ("IB GB/node", "ib_gb_node"),
    ("exposed ms", "exposed_ms"),
    ("step ms", "step_ms"),
    ("img/s/GPU", "img_s_gpu"),
    ("MFU", "mfu"),
    ("800 ep days", "days_800ep"),
]


def _cells(r: Row, best: bool) -> list[str]:
    out = []
    for title, attr in COLUMNS:
        if title == "micro x acc":
            out.append(f"{r.micro} x {r.accum}")
        elif title == "fits":
            out.append("yes" if r.fits else "OOM")
        elif title == "strategy":
            out.append(r.strategy + (" *" if best else ""))
        else:
            v = getattr(r, attr)
            out.append(f"{v:.3g}" if isinstance(v, float) else str(v))
    return out


def format_table(rows: list[Row], best: dict, markdown: bool = False) -> str:
    headers = [t for t, _ in COLUMNS]
    cells = [_cells(r, best.get((r.model, r.nodes)) is r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["LightningDiT-XL/1", "LightningDiT-1p6B/1"])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 16, 64])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    m = p.add_argument_group("measured single-GPU step (defaults: the issue's figures, ASSUMPTIONS)")
    m.add_argument("--measured-model", default=Measured.model)
    m.add_argument("--img-s", type=float, default=Measured.img_s, help="measured training img/s on one GPU")
    m.add_argument("--at-batch", type=int, default=Measured.at_batch, help="batch of that measurement")
    m.add_argument("--mem-gib", type=float, default=Measured.mem_gib, help="peak memory of that measurement")
    m.add_argument("--micro-overhead-ms", type=float, default=Measured.micro_overhead_ms)
    m.add_argument("--overhead-gib", type=float, default=Measured.overhead_gib)
    h = p.add_argument_group("cluster")
    h.add_argument("--peak-tflops", type=float, default=Cluster.peak_tflops)
    h.add_argument("--hbm-gib", type=float, default=Cluster.hbm_gib)
    h.add_argument("--nvlink-gbs", type=float, default=Cluster.nvlink_gbs, help="GB/s, both directions")
    h.add_argument("--nic-gbits", type=float, default=Cluster.nic_gbits, help="Gb/s per GPU NIC")
    h.add_argument("--link-eff", type=float, default=Cluster.link_eff)
    k = p.add_argument_group("knobs")
    k.add_argument("--grad-bytes", type=int, default=Knobs.grad_bytes, choices=[2, 4])
    k.add_argument("--param-bytes", type=int, default=Knobs.param_bytes, choices=[2, 4])
    k.add_argument("--overlap-slowdown", type=float, default=Knobs.overlap_slowdown)
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    return p.parse_args(argv)


def run(args) -> tuple[list[Row], dict]:
    cl = Cluster(
        peak_tflops=args.peak_tflops,
        hbm_gib=args.hbm_gib,
        nvlink_gbs=args.nvlink_gbs,
        nic_gbits=args.nic_gbits,
        link_eff=args.link_eff,
    )
    knobs = Knobs(grad_bytes=args.grad_bytes, param_bytes=args.param_bytes, overlap_slowdown=args.overlap_slowdown)
    meas = Measured(
        img_s=args.img_s,
        at_batch=args.at_batch,
        mem_gib=args.mem_gib,
        model=args.measured_model,
        micro_overhead_ms=args.micro_overhead_ms,
        overhead_gib=args.overhead_gib,
    )
    cal = Calibration(meas, model_spec(meas.model), cl, knobs)
    rows = []
    for name in args.models:
        spec = model_spec(name)
        for n in args.nodes:
            for s in args.strategies:
                r = evaluate(spec, n, s, cal, knobs, cl, args.global_batch)
                if r is not None:
                    rows.append(r)
    return rows, recommend(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, best = run(args)
    steps = EPOCHS * (IMAGENET_TRAIN // args.global_batch)
    print(
        f"measured: {args.measured_model} {args.img_s:g} img/s at batch {args.at_batch}, {args.mem_gib:g} GiB "
        f"(one GPU); global batch {args.global_batch}, {steps} steps = {EPOCHS} epochs; NVLink {args.nvlink_gbs:g} "
        f"GB/s, {args.nic_gbits:g} Gb/s IB per GPU, link efficiency {args.link_eff:g}; * = recommended"
    )
    print(format_table(rows, best, args.markdown))
    print()
    for (model, nodes), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        print(
            f"recommended {model} @ {nodes} node(s): {r.strategy} (micro {r.micro} x {r.accum}, "
            f"{r.img_s_gpu:.0f} img/s/GPU, MFU {r.mfu:.0%}, {r.mem_gib:.0f} GiB, {r.days_800ep:.1f} days)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
