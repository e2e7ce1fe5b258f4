"""Fast fixed-grid Euler sampling with CFG interval: compiled steps and CUDA graphs, same arithmetic as ``Sampler``.

    from models.fast_sampling import FastEulerSampler
    fast = FastEulerSampler(sampler, model, compile=True, cuda_graphs=True, autocast_dtype=torch.bfloat16)
    latents = fast.sample(z, labels)            # same result as sampler.sample(model, z, labels) under autocast

``models.sampling.Sampler`` stays the reference (and the default everywhere); this module only adds an opt-in
execution path for its ``method="euler"`` sampler, the one used for FID:

* **Plan on the host.** ``euler_plan(sampler)`` lists ``(t, dt, guided)`` per step from the same float32 grid
  as ``Sampler._euler``; whether a step is guided comes from ``Sampler.guidance_on(t)`` (host floats, no device
  reads). Guided steps run the doubled batch ``[x, x] / [y, null]``; the others (``t < cfg_interval_start``,
  or ``cfg_scale <= 1``, or no labels) run only the conditional batch, as the reference does.
* **Two step functions**, one per batch shape: ``cond(x, t, y, dt) = x + dt * v(x, t, y)`` and
  ``guided(x, t2, y2, dt) = x + dt * guided_velocity(...)``, with exactly the reference's operations (the same
  ``torch.cat``, ``.to(x.dtype)``, ``guided_velocity`` and update). ``t`` and ``dt`` are passed as float32
  tensors (the grid values are float32, so ``dt * v`` is the same product as with the Python float).
* ``compile=True``: each step function is ``torch.compile``d with static shapes (``dynamic=False``,
  ``fullgraph=True``), so the model, the guidance and the Euler update are one graph per batch shape (two
  compilations in all, done by the first ``sample`` call). ``compile_mode`` is passed through
  (``"reduce-overhead"`` = Inductor's CUDA graph trees; then the carried state is cloned after every step
  and ``torch.compiler.cudagraph_mark_step_begin()`` marks each step).
* ``cuda_graphs=True`` (CUDA only): both step functions (eager or compiled with the default mode) are captured
  once per (batch, shape, dtype, device) as ``torch.cuda.CUDAGraph``s sharing one memory pool, updating a
  static state buffer in place; a step is then two tiny fills (t, dt) and one replay. Parameters updated in
  place (an EMA, ``load_state_dict``) are seen by the graphs; call ``reset()`` after replacing parameter tensors.
* ``autocast_dtype`` (e.g. ``torch.bfloat16``): the step runs under ``torch.autocast`` with
  ``cache_enabled=False`` (required inside graph capture; the cache only saves re-casting weights). The
  reference equivalent is ``with torch.autocast(device_type, dtype): sampler.sample(model, z, y)``.

Numerics: eager without graphs performs the reference's operations in the same order (bitwise equal results
are expected, and tested on CPU). Compilation fuses element-wise work and may reorder reductions, so compiled
samples differ by rounding only: ``tools/bench_sample.py`` reports the max / relative difference to the eager
path and checks it against the precision's tolerance.

Cost: ``forward_images(sampler, labels=True)`` = model forward passes per image (guided steps count twice),
``nfe(sampler)`` = model calls per image; FLOPs per image = ``model.flops_per_image(training=False) *
forward_images``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from models.sampling import Sampler, guided_velocity

__all__ = ["FastEulerSampler", "euler_plan", "forward_images", "nfe"]


def euler_plan(sampler: Sampler, labels: bool = True) -> list[tuple[float, float, bool]]:
    """``(t, dt, guided)`` for each Euler step of ``sampler`` (the reference's grid arithmetic)."""
    if sampler.method != "euler":
        raise ValueError(f"the fast path supports method='euler' only, got {sampler.method!r}")
    grid = sampler.grid()
    ts = grid.tolist()
    dts = (grid[1:] - grid[:-1]).tolist()  # float32 differences, as Sampler._euler
    return [(t, dt, bool(labels and sampler.guidance_on(t))) for t, dt in zip(ts[:-1], dts)]


def nfe(sampler: Sampler) -> int:
    """Model calls per sample (each on the doubled batch where guided): ``num_steps - 1`` for Euler."""
    calls = sampler.num_model_calls()
    if calls is None:
        raise ValueError("dopri5 is adaptive: its number of model calls is not known in advance")
    return calls


def forward_images(sampler: Sampler, labels: bool = True) -> int:
    """Per-image model forward passes of one Euler sample: 1 per unguided step, 2 per guided step."""
    return sum(2 if guided else 1 for _, _, guided in euler_plan(sampler, labels))


class FastEulerSampler:
    """Opt-in fast execution of ``sampler`` (``method="euler"``) for ``model``; see the module docstring."""

    def __init__(
        self,
        sampler: Sampler,
        model: nn.Module,
        *,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        compile_backend: str = "inductor",
        cuda_graphs: bool = False,
        autocast_dtype: Optional[torch.dtype] = None,
        warmup_iters: int = 2,
    ):
        if sampler.method != "euler":
            raise ValueError(f"FastEulerSampler supports method='euler' only, got {sampler.method!r}")
        if cuda_graphs and compile and compile_mode not in (None, "default", "max-autotune-no-cudagraphs"):
            raise ValueError(f"cuda_graphs=True captures graphs itself; use compile_mode=None, not {compile_mode!r}")
        if cuda_graphs and not torch.cuda.is_available():
            raise ValueError("cuda_graphs=True needs CUDA")
        self.sampler = sampler
        self.model = model
        self.compile = bool(compile)
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.cuda_graphs = bool(cuda_graphs)
        self.autocast_dtype = autocast_dtype
        self.warmup_iters = int(warmup_iters)
        self._reduce_overhead = self.compile and compile_mode == "reduce-overhead"
        cond, guided = self._make_steps()
        if self.compile:
            kw = dict(backend=compile_backend, dynamic=False, fullgraph=True)
            if compile_mode is not None:
                kw["mode"] = compile_mode
            cond, guided = torch.compile(cond, **kw), torch.compile(guided, **kw)
        self._cond_step: Callable = cond
        self._guided_step: Callable = guided
        self._graphs: Optional[SimpleNamespace] = None
        self._dt_cache: Optional[tuple] = None

    # ------------------------------------------------------------------ step functions
    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _make_steps(self):
        model, scale, mode = self.model, self.sampler.cfg_scale, self.sampler.guidance_mode

        def cond_step(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor], dt: torch.Tensor):
            with self._autocast(x.device):
                v = model(x, t, y).to(x.dtype)
                return x + dt * v

        def guided_step(x: torch.Tensor, t2: torch.Tensor, y2: torch.Tensor, dt: torch.Tensor):
            b = x.shape[0]
            with self._autocast(x.device):
                out = model(torch.cat([x, x], dim=0), t2, y2).to(x.dtype)
                return x + dt * guided_velocity(out[:b], out[b:], scale, mode)

        return cond_step, guided_step

    def reset(self) -> None:
        """Drop captured CUDA graphs (after replacing parameter tensors, or to free their memory pool)."""
        self._graphs = None

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """Euler sample from noise ``z`` for labels ``y`` (None: unconditional); returns a new tensor."""
        if self.model.training:
            raise RuntimeError("FastEulerSampler: put the model in eval mode (label dropout is random in training)")
        plan = euler_plan(self.sampler, labels=y is not None)
        if self.cuda_graphs:
            return self._sample_graphs(z, y, plan)
        return self._sample_loop(z, y, plan)

    def _sample_loop(self, z, y, plan):
        b, dev = z.shape[0], z.device
        y2 = None if y is None else torch.cat([y, torch.full_like(y, self.sampler.null_class)], dim=0)
        dts = self._dt_tensors(plan, dev)
        x = z
        for (t, _, guided), dt_t in zip(plan, dts):
            if self._reduce_overhead:
                torch.compiler.cudagraph_mark_step_begin()
            if guided:
                x = self._guided_step(x, torch.full((2 * b,), t, dtype=torch.float32, device=dev), y2, dt_t)
            else:
                x = self._cond_step(x, torch.full((b,), t, dtype=torch.float32, device=dev), y, dt_t)
            if self._reduce_overhead:
                x = x.clone()  # the graph's output buffer is reused by its next replay
        return x if x is not z else x.clone()

    def _dt_tensors(self, plan, device: torch.device) -> list[torch.Tensor]:
        """One 0-dim float32 tensor per step on ``device`` (one host-to-device copy, cached): no per-step copies,
        and separate storages so compiled steps see the same input layout every call."""
        key = (str(device), tuple(dt for _, dt, _ in plan))
        if self._dt_cache is None or self._dt_cache[0] != key:
            table = torch.tensor([dt for _, dt, _ in plan], dtype=torch.float32).to(device)
            self._dt_cache = (key, [table[i].clone() for i in range(len(plan))])
        return self._dt_cache[1]

    def _capture(self, z: torch.Tensor, y: Optional[torch.Tensor], plan) -> SimpleNamespace:
        b, dev = z.shape[0], z.device
        s = SimpleNamespace(key=(tuple(z.shape), z.dtype, dev, y is None))
        s.x = z.clone()
        s.t1 = torch.zeros(b, dtype=torch.float32, device=dev)
        s.t2 = torch.zeros(2 * b, dtype=torch.float32, device=dev)
        s.dt = torch.zeros((), dtype=torch.float32, device=dev)
        s.y = None if y is None else y.clone()
        s.y2 = None if y is None else torch.cat([y, torch.full_like(y, self.sampler.null_class)], dim=0)
        need_guided = any(g for _, _, g in plan)
        need_cond = any(not g for _, _, g in plan)

        def run_cond():
            s.x.copy_(self._cond_step(s.x, s.t1, s.y, s.dt))

        def run_guided():
            s.x.copy_(self._guided_step(s.x, s.t2, s.y2, s.dt))

        # Warm up on a side stream (compilation, autotuning, cuBLAS workspaces), as torch.cuda.graphs advises.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup_iters)):
                if need_cond:
                    run_cond()
                if need_guided:
                    run_guided()
        torch.cuda.current_stream(dev).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        s.cond = s.guided = None
        if need_cond:
            s.cond = torch.cuda.CUDAGraph()
            with torch.cuda.graph(s.cond, pool=pool):
                run_cond()
        if need_guided:
            s.guided = torch.cuda.CUDAGraph()
            with torch.cuda.graph(s.guided, pool=pool):
                run_guided()
        return s

    def _sample_graphs(self, z, y, plan):
        if z.device.type != "cuda":
            raise ValueError("cuda_graphs=True: z must be on a CUDA device")
        key = (tuple(z.shape), z.dtype, z.device, y is None)
        if self._graphs is None or self._graphs.key != key:
            self._graphs = None
            self._graphs = self._capture(z, y, plan)
        s = self._graphs
        s.x.copy_(z)
        if y is not None:
            s.y.copy_(y)
            s.y2[: y.shape[0]].copy_(y)
        for t, dt, guided in plan:
            s.dt.fill_(dt)
            if guided:
                s.t2.fill_(t)
                s.guided.replay()
            else:
                s.t1.fill_(t)
                s.cond.replay()
        return s.x.clone()
