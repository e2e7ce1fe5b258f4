"""LightningDiT training task: flow-matching loss (MSE + cosine) on precomputed latents (+ REPA: models/repa.py)."""

from __future__ import annotations

from typing import Any

import torch

from core.config import Checks, train_ema_decays
from core.rng import seed_for
from core.task import PartSpec, StepContext, Task
from data.sources import StreamingSource
from models.dit_config import TimestepPhase, check_dit_task, repa_z_dim
from models.evaluation.in_loop import InLoopEvaluator, check_eval_config
from models.evaluation.validation import ValidationLoss, evaluate_dit
from models.lightningdit import build_model
from models.loading import load_into_model
from models.repa import RepaCapture, attach_repa, features_to_tokens, repa_loss_per_sample
from models.transport import PhaseTracker, Transport, timestep_phase_at


class DiTTask(Task):
    @classmethod
    def check_config(cls, cfg, checks: Checks) -> None:
        check_dit_task(cfg, checks)

    def __init__(self, cfg, dist):
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.transport = Transport(use_cosine_loss=cfg.transport.use_cosine_loss)
        # Timestep-sampling phases: a function of the step (StepContext); the tracker reports the switches.
        self.phase_tracker = PhaseTracker(cfg.transport.timestep_sampling)
        # Timestep and noise draws: one generator per rank, seeded so that ranks draw different
        # values, saved in every checkpoint so that a resumed run draws the same values (another world size: reseed).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + dist.rank)
        self._flops = None
        self._eval = None  # models.evaluation.in_loop.InLoopEvaluator, built on first use
        self._val = None  # models.evaluation.validation.ValidationLoss, built on first use

    def build_models(self) -> dict[str, PartSpec]:
        model = build_model(self.cfg.model)
        if self.cfg.model.init_from:
            load_into_model(model, self.cfg.model.init_from, which="ema", strict=True)
        self._flops = model.flops_per_image(training=True)
        r = self.cfg.repa
        if r.enabled:  # after init_from: the projector is new (an official checkpoint has none)
            projector = attach_repa(model, r.depth, r.projector_dim, repa_z_dim(r))
            self._flops += 3 * model.num_patches * projector.flops_per_token()  # forward + backward
        return {
            "model": PartSpec(
                module=model,
                optimizer=self.cfg.optimizer,
                ema_decay=train_ema_decays(self.cfg.train),
                blocks_attr="blocks",
                grad_clip=self.cfg.train.grad_clip,
            )
        }

    def phases(self) -> list[str]:
        return ["model"]

    def build_data(self, *, micro_batch_size: int, global_batch_size: int):
        m = self.cfg.model
        return StreamingSource(
            self.cfg.data,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            seed=self.cfg.seed,
            dist=self.dist,
            expected_shape=(m.in_channels, m.input_size, m.input_size),
            num_classes=m.num_classes,
            **self._repa_data_kwargs(),
        )

    def _repa_data_kwargs(self) -> dict[str, Any]:
        """REPA: the stored features must be those of the image whose latent is read (``features_flip`` for
        ``latent_flip``) and hold one ``z_dim`` vector per DiT token."""
        if not self.cfg.repa.enabled:
            return {}
        return {"pair_flip_features": True, "expected_features_shape": self._repa_features_shape()}

    def _repa_features_shape(self) -> tuple[int, int, int]:
        with torch.device("meta"):
            grid = build_model(self.cfg.model).grid_size
        return (repa_z_dim(self.cfg.repa), grid, grid)

    def timestep_phase(self, ctx: StepContext) -> tuple[int, TimestepPhase]:
        """(index, phase) of ``transport.timestep_sampling`` in force at ``ctx.step``; the first phase without
        ``ctx.steps_per_epoch`` (outside the trainer's loop, e.g. tools/bench_train.py)."""
        phases = self.cfg.transport.timestep_sampling
        steps_per_epoch = getattr(ctx, "steps_per_epoch", None)
        if steps_per_epoch is None:
            return 0, phases[0]
        return timestep_phase_at(ctx.step, steps_per_epoch, phases)

    def on_step(self, ctx: StepContext) -> list[str]:
        """The switch of timestep-sampling phase, when ``ctx.step`` is the first step of a new phase."""
        if getattr(ctx, "steps_per_epoch", None) is None:
            return []
        message = self.phase_tracker.update(ctx.step, ctx.steps_per_epoch)
        return [message] if message else []

    def step_metrics(self, ctx: StepContext) -> dict[str, Any]:
        return {"timestep_phase": self.timestep_phase(ctx)[0]}

    def loss(
        self, phase: str, batch: dict[str, torch.Tensor], parts: dict[str, Any], ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1 = batch["latent"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        model = parts[phase].module
        if self.cfg.repa.enabled:  # the model also returns the projected tokens of block repa.depth
            model = RepaCapture(model)
        terms = self.transport.training_losses(
            model, x1, {"y": y}, phase=self.timestep_phase(ctx)[1], generator=self.generator
        )
        loss = terms["loss"].mean()
        metrics = {"loss": loss.detach(), "mse": terms["mse"].mean().detach(), "cos": terms["cos"].mean().detach()}
        if self.cfg.repa.enabled:
            target = features_to_tokens(batch["features"].to(self.device, non_blocking=True).float())
            proj_loss = repa_loss_per_sample(model.projected, target).mean()
            metrics["diffusion_loss"] = metrics["loss"]
            metrics["repa_loss"] = proj_loss.detach()
            loss = loss + self.cfg.repa.weight * proj_loss
            metrics["loss"] = loss.detach()
        return loss, metrics

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random latents (N(0, 1), the normalised latent scale) and class labels (+ REPA features)."""
        m = self.cfg.model
        batch = {
            "latent": torch.randn(
                batch_size, m.in_channels, m.input_size, m.input_size, device=self.device, generator=generator
            ),
            "label": torch.randint(0, m.num_classes, (batch_size,), device=self.device, generator=generator),
        }
        if self.cfg.repa.enabled:  # stored DINOv2 features (float16, as in the shards)
            shape = (batch_size, *self._repa_features_shape())
            batch["features"] = torch.randn(shape, device=self.device, generator=generator).half()
        return batch

    def flops_per_image(self):
        return self._flops

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def reseed(self, step: int, rank: int) -> None:
        """Resumed on another world size: a fresh stream for ``rank`` from (seed, step, rank) (core/rng.py)."""
        self.generator.manual_seed(seed_for(self.cfg.seed, step, rank, "dit/timesteps+noise"))

    # ------------------------------------------------------------------ in-loop evaluation
    def evaluate(
        self, parts: dict[str, Any], step: int, kinds: frozenset[str] = frozenset({"samples"})
    ) -> dict[str, Any]:
        """Collective, every rank: models/evaluation/validation.evaluate_dit (in-loop FID of every EMA, the
        validation loss)."""
        return evaluate_dit(self, parts["model"], step, kinds)

    def check(self) -> None:
        """Cheap, local checks of the ``eval`` section (models/evaluation/in_loop.check_eval_config)."""

        check_eval_config(self.cfg)

    def _evaluator(self):
        if self._eval is None:
            m = self.cfg.model
            self._eval = InLoopEvaluator(
                self.cfg, self.dist, num_classes=m.num_classes, latent_shape=(m.in_channels, m.input_size, m.input_size)
            )
        return self._eval

    def _validator(self):
        if self._val is None:
            m = self.cfg.model
            self._val = ValidationLoss(self.cfg, self.dist, latent_shape=(m.in_channels, m.input_size, m.input_size))
        return self._val
