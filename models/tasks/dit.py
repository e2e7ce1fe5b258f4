"""LightningDiT training task: flow-matching loss (MSE + cosine) on precomputed latents."""
from __future__ import annotations

from typing import Any, Optional

import torch

from core.task import PartSpec, StepContext, Task
from models.lightningdit import build_model
from models.transport import Transport


class DiTTask(Task):
    def __init__(self, cfg, dist):
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.transport = Transport(use_cosine_loss=cfg.transport.use_cosine_loss)
        # Timestep and noise draws: one generator per rank, seeded so that ranks draw different
        # values, saved in every checkpoint so that a resumed run draws the same values.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + dist.rank)
        self._flops = None

    def build_models(self) -> dict[str, PartSpec]:
        model = build_model(self.cfg.model)
        if self.cfg.model.init_from:
            from models.loading import load_into_model
            load_into_model(model, self.cfg.model.init_from, which="ema", strict=True)
        self._flops = model.flops_per_image(training=True)
        return {"model": PartSpec(module=model, optimizer=self.cfg.optimizer,
                                  ema_decay=self.cfg.train.ema_decay, blocks_attr="blocks",
                                  grad_clip=self.cfg.train.grad_clip)}

    def phases(self) -> list[str]:
        return ["model"]

    def build_data(self, *, micro_batch_size: int, global_batch_size: int):
        from data.sources import StreamingSource
        m = self.cfg.model
        return StreamingSource(self.cfg.data, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                               seed=self.cfg.seed, dist=self.dist,
                               expected_shape=(m.in_channels, m.input_size, m.input_size))

    def loss(self, phase: str, batch: dict[str, torch.Tensor], parts: dict[str, Any],
             ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1 = batch["latent"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        terms = self.transport.training_losses(parts[phase].module, x1, {"y": y},
                                               phase=ctx.timestep_phase, generator=self.generator)
        loss = terms["loss"].mean()
        metrics = {"loss": loss.detach(), "mse": terms["mse"].mean().detach(),
                   "cos": terms["cos"].mean().detach()}
        return loss, metrics

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random latents (N(0, 1), the normalised latent scale) and class labels."""
        m = self.cfg.model
        return {"latent": torch.randn(batch_size, m.in_channels, m.input_size, m.input_size, device=self.device,
                                      generator=generator),
                "label": torch.randint(0, m.num_classes, (batch_size,), device=self.device, generator=generator)}

    def flops_per_image(self):
        return self._flops

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ in-loop evaluation
    def evaluate(self, parts: dict[str, Any], step: int) -> dict[str, Any]:
        """Sample ``eval.num_samples`` images with the EMA weights and score them (collective, every rank).

        Image i's label and noise depend on (``eval.seed``, i) only (tools/sample.py), so every evaluation of a
        run scores the same noise. Chunks of ``eval.batch_size`` indices go round-robin over the ranks; every
        rank runs the same number of sampler batches of the same shape (the last round is padded), with a plain
        full copy of the EMA weights (``TrainedPart.full_model``, any engine). Each rank decodes its images
        (tools/sample.latent_decoder) and extracts their features; rank 0 gathers the features and computes the
        metrics against ``eval.reference`` (tools/fid.py), writes ``<run_dir>/eval/step_XXXXXXX.{json,png}``
        (metrics, sampler settings, a sample grid) and, when a W&B run is active in this process, logs the grid
        as ``eval/samples``. Every rank returns the same dict: the metrics (``fid``, ...), ``num_samples`` and the
        sampler settings (``cfg_scale``, ``num_steps``, ``cfg_interval_start``, ``timestep_shift``), plus ``time_s``.
        """
        import contextlib
        import math
        import time

        import torch.distributed as tdist

        from core.distributed import broadcast_object
        from tools.sample import chunk_range, sample_indices

        ev = self._eval_setup()
        ec = self.cfg.eval
        t0 = time.perf_counter()
        part = parts["model"]
        # A plain copy of the full EMA (else raw) weights on every rank, whatever the engine and its sharding
        # (collective gather, then a local forward: adaptive samplers may call it different numbers of times).
        full = contextlib.ExitStack()
        model = full.enter_context(part.full_model("ema" if getattr(part, "ema", None) is not None else "model"))
        was_training = model.training            # the raw weights (no EMA) are in training mode: label dropout
        model.eval()
        rank, world = self.dist.rank, self.dist.world_size
        n, b = ec.num_samples, ec.batch_size
        chunks = math.ceil(n / b)
        feats: dict[str, list[torch.Tensor]] = {}
        grid: list[torch.Tensor] = []
        kept = 0
        try:
            for k in range(math.ceil(chunks / world)):
                c = k * world + rank
                indices = list(chunk_range(c, b, n)) if c < chunks else []
                images, _ = sample_indices(ev["sampler"], model, ev["decode"], indices, ec.seed,
                                           self.cfg.model.num_classes, ev["latent_shape"], ec.labels, self.device,
                                           chunk=c, pad_to=b)
                if not indices:
                    continue
                feats.setdefault("_index", []).append(torch.tensor(indices, dtype=torch.long))
                for key, value in ev["extractor"](images).items():
                    feats.setdefault(key, []).append(value)
                if rank == 0 and kept < ec.grid_size:
                    grid.append(images[: ec.grid_size - kept].cpu())
                    kept += len(grid[-1])
        finally:
            model.train(was_training)
            full.close()
        local = {key: torch.cat(v) for key, v in feats.items()}
        gathered: list[Any] = [None] * world if rank == 0 else None
        if world > 1:
            tdist.gather_object(local, gathered, dst=0)
        else:
            gathered = [local]
        outcome: tuple[Optional[dict], Optional[str]] = (None, None)
        if rank == 0:
            try:
                outcome = (self._eval_finish(ev, gathered, grid, step, time.perf_counter() - t0), None)
            except Exception as err:  # noqa: BLE001 - every rank must learn about it
                outcome = (None, f"{type(err).__name__}: {err}")
        result, error = broadcast_object(outcome) if world > 1 else outcome
        if error is not None:
            raise RuntimeError(f"in-loop evaluation at step {step} failed: {error}")
        return result

    def check(self) -> None:
        """Cheap, local checks of the ``eval`` section (metric names, sampler overrides, reference and weights
        files), so that a bad setting fails at start-up rather than at the first evaluation; a no-op when in-loop
        evaluation is off. Raises ValueError / FileNotFoundError naming the key."""
        ec = self.cfg.eval
        if not ec.every_epochs:
            return
        import copy

        from core.config import ConfigError, apply_overrides
        from tools.fid import Reference, check_weights, resolve_extractor, normalize_metrics

        normalize_metrics(ec.metrics, key="eval.metrics")
        try:
            apply_overrides(copy.deepcopy(self.cfg), [f"sampling.{o}" for o in ec.sampling_overrides])
        except ConfigError as err:
            raise ValueError(f"eval.sampling_overrides: {err}") from None
        check_weights(resolve_extractor(ec.feature_extractor), ec.feature_extractor_weights or None,
                       "eval.feature_extractor_weights")
        Reference.open(ec.reference, key="eval.reference")

    def _eval_setup(self) -> dict[str, Any]:
        """Built once, on the first evaluation: sampler, decoder, feature extractor, reference (rank 0).
        A problem on any rank (missing weights file or reference, bad override) is raised on every rank."""
        cached = getattr(self, "_eval_state", None)
        if cached is not None:
            return cached
        import copy

        import torch.distributed as tdist

        from core.config import ConfigError, apply_overrides
        from models.sampling import Sampler
        from tools.fid import Extractor, Reference, normalize_metrics, reference_data
        from tools.leaderboard import describe_sampling
        from tools.sample import latent_decoder, tokenizer_kind

        ec = self.cfg.eval
        state: dict[str, Any] = {}
        error = None
        try:
            if ec.batch_size < 1 or ec.num_samples < 1:
                raise ValueError("eval.num_samples and eval.batch_size must be >= 1")
            if ec.grid_size < 0:
                raise ValueError(f"eval.grid_size: must be >= 0, got {ec.grid_size}")
            metrics = normalize_metrics(ec.metrics, key="eval.metrics")
            sampling_cfg = copy.deepcopy(self.cfg)
            try:
                apply_overrides(sampling_cfg, [f"sampling.{o}" for o in ec.sampling_overrides])
            except ConfigError as err:
                raise ValueError(f"eval.sampling_overrides: {err}") from None
            sampling = sampling_cfg.sampling
            state["sampling"] = sampling
            state["sampler"] = Sampler.from_config(sampling, null_class=self.cfg.model.num_classes)
            m = self.cfg.model
            state["latent_shape"] = (m.in_channels, m.input_size, m.input_size)
            data_dir = self.cfg.data.path or None
            state["decode"] = latent_decoder(data_dir, self.cfg.data.latent_norm, self.cfg.data.latent_multiplier,
                                             str(self.device))
            state["tokenizer"] = tokenizer_kind(data_dir)
            state["extractor"] = Extractor(ec.feature_extractor, ec.feature_extractor_weights or None, metrics,
                                           self.device)
            if self.dist.rank == 0:
                reference = Reference.open(ec.reference, key="eval.reference")
                state["reference"] = reference
                state["reference_data"] = reference_data(reference, state["extractor"], ec.cache_dir or None)
            state["describe"] = describe_sampling(sampling)
        except Exception as err:  # noqa: BLE001 - collected from every rank below
            error = f"rank {self.dist.rank}: {type(err).__name__}: {err}"
        errors = [error]
        if self.dist.world_size > 1:
            errors = [None] * self.dist.world_size
            tdist.all_gather_object(errors, error)
        errors = [e for e in errors if e]
        if errors:
            raise ValueError("in-loop evaluation cannot start: " + "; ".join(errors))
        self._eval_state = state
        return state

    def _eval_finish(self, ev: dict[str, Any], gathered: list, grid: list, step: int, seconds: float) -> dict:
        """Rank 0: metrics from the gathered features, grid + JSON under <run_dir>/eval, W&B image."""
        import json
        import logging
        import sys

        from core.config import config_to_dict, resolve_run_dir
        from tools.fid import compute_metrics
        from tools.sample import image_grid, save_png

        log = logging.getLogger("llat")
        parts = [g for g in gathered if g]
        index = torch.cat([g["_index"] for g in parts])
        order = torch.argsort(index)             # image order: the metrics do not depend on the world size
        feats = {k: torch.cat([g[k] for g in parts])[order] for k in parts[0] if k != "_index"}
        metrics = compute_metrics(feats, ev["extractor"], ev["reference_data"])
        skipped = metrics.pop("skipped", [])
        if skipped:
            log.warning("eval: %s need reference images; %s has none", skipped, ev["reference"].describe())
        s = ev["sampling"]
        result: dict[str, Any] = {**metrics, "cfg_scale": float(s.cfg_scale), "num_steps": int(s.num_steps),
                                  "cfg_interval_start": float(s.cfg_interval_start),
                                  "timestep_shift": float(s.timestep_shift), "time_s": round(seconds, 3)}
        out_dir = resolve_run_dir(self.cfg) / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        grid_path = None
        if grid:
            images = torch.cat(grid)
            h = images.shape[-2]
            grid_path = save_png(image_grid(images, columns=8), out_dir / f"step_{step:07d}.png",
                                 scale=max(1, 64 // max(h, 1)))
        record = {"step": step, "metrics": result, "sampler": ev["describe"], "sampling": config_to_dict(s),
                  "tokenizer": ev["tokenizer"], "reference": ev["reference"].describe(),
                  "feature_extractor": ev["extractor"].name, "labels": self.cfg.eval.labels,
                  "seed": self.cfg.eval.seed, "grid": str(grid_path) if grid_path else None}
        tmp = out_dir / f".step_{step:07d}.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out_dir / f"step_{step:07d}.json")
        wandb = sys.modules.get("wandb")            # the trainer's W&B run, when one is active in this process
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is not None:
            try:
                if grid_path is not None:
                    run.log({"eval/samples": wandb.Image(str(grid_path), caption=ev["describe"])}, step=step)
                run.summary.update({"eval/sampler": ev["describe"], "eval/tokenizer": ev["tokenizer"],
                                    "eval/reference": record["reference"],
                                    "eval/feature_extractor": record["feature_extractor"]})
            except Exception as err:  # noqa: BLE001 - logging must never stop training
                log.warning("eval: could not log the sample grid to W&B: %s", err)
        log.info("eval step %d: %s (%s, %.0f s)", step,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), ev["describe"], seconds)
        return result
