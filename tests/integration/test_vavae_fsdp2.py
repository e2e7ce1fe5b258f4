"""VA-VAE adaptive weights under FSDP2 against an unsharded reference on REAL gloo ranks (2 ranks with gradient
accumulation; 1 rank under bf16 autocast). The model itself: tests/unit/test_vavae.py.

Every pretrained network here is RANDOMLY INITIALISED (``random_init: true`` in configs/tiny_vavae.yaml).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from dist_utils import run_distributed
from test_vavae import REPO, TINY16

pytestmark = pytest.mark.usefixtures("one_thread")


def _plain_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _fsdp_grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor().detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _full_params(module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return {
        k: v.detach().clone()
        for k, v in get_model_state_dict(module, options=StateDictOptions(full_state_dict=True)).items()
    }


def _fsdp_vs_unsharded(dist, accum: int, overrides: list[str]):
    """Two training steps (AE phase then disc phase, `accum` micro-batches each) of the real task on FSDP2 parts
    and, side by side, on plain unsharded copies (gradients averaged over ranks by hand). Returns the largest
    differences seen."""
    import torch.distributed as tdist

    from core.engines.base import LocalPart, build_optimizer
    from core.engines.fsdp2 import FSDP2Engine
    from launchers.experiment import load_config
    from models.tasks.vavae import VAVAETask

    cfg = load_config(REPO / "configs/tiny_vavae.yaml", overrides)
    autocast = cfg.engine.precision == "bf16-autocast"
    task, ref_task = VAVAETask(cfg, dist), VAVAETask(cfg, dist)  # same rank -> same noise generator
    specs = task.build_models()
    ref = {name: copy.deepcopy(spec.module) for name, spec in specs.items()}
    engine = FSDP2Engine(cfg.engine, dist)
    parts = {
        n: engine.prepare(n, s.module, s.optimizer, s.ema_decay, blocks_attr=s.blocks_attr, grad_clip=s.grad_clip)
        for n, s in specs.items()
    }
    ref_parts = {n: LocalPart(n, m) for n, m in ref.items()}
    ref_opt = {
        n: build_optimizer([p for p in m.parameters() if p.requires_grad], specs[n].optimizer, dist.device)
        for n, m in ref.items()
    }
    g = torch.Generator().manual_seed(100 + dist.rank)
    diffs = {"weights": 0.0, "grads": 0.0, "params": 0.0, "buffers": 0.0}
    seen = {"d_weight": 0.0, "vf_weight": 0.0}

    def worst(key, a, b):
        for k in b:
            scale = max(1.0, float(b[k].abs().max()))
            diffs[key] = max(diffs[key], float((a[k] - b[k]).abs().max()) / scale)

    for step in range(2):
        batches = [{"image": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1} for _ in range(accum)]
        for phase in ("autoencoder", "discriminator"):
            ctx = SimpleNamespace(step=step)
            for k, batch in enumerate(batches):
                with engine.autocast():  # as the trainer; the reference: the same autocast
                    loss, m = task.loss(phase, batch, parts, ctx)
                parts[phase].backward(loss / accum, sync=(k == accum - 1))
                with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=autocast):
                    ref_loss, ref_m = ref_task.loss(phase, batch, ref_parts, ctx)
                (ref_loss / accum).backward()
                for key in m:
                    d = abs(float(m[key]) - float(ref_m[key])) / max(1.0, abs(float(ref_m[key])))
                    diffs["weights"] = max(diffs["weights"], d)
                for key in seen:
                    if key in m:
                        seen[key] = max(seen[key], float(m[key]))
            ref_grads = _plain_grads(ref[phase])
            for v in ref_grads.values():
                tdist.all_reduce(v)
                v /= dist.world_size
            worst("grads", _fsdp_grads(parts[phase].module), ref_grads)
            for n, p in ref[phase].named_parameters():
                if n in ref_grads:
                    p.grad = ref_grads[n]
            parts[phase].step()
            ref_opt[phase].step()
            ref_opt[phase].zero_grad(set_to_none=True)
            worst("params", _full_params(parts[phase].module), {k: v for k, v in ref[phase].state_dict().items()})
    worst(
        "buffers",
        {n: b for n, b in parts["discriminator"].module.named_buffers()},
        {n: b.float() if b.is_floating_point() else b for n, b in ref["discriminator"].named_buffers()},
    )
    return diffs, seen


@pytest.mark.timeout(300)
def test_adaptive_weights_under_fsdp2_match_unsharded_reference():
    # disc_start 1: step 0 runs without the GAN terms, step 1 crosses into them; accumulation of 2 micro-batches.
    overrides = TINY16 + ["vavae.loss.disc_start=1"]
    results = run_distributed(_fsdp_vs_unsharded, world_size=2, args=(2, overrides), timeout_s=240)
    for diffs, seen in results:
        assert seen["d_weight"] > 0 and seen["vf_weight"] > 0, seen  # both adaptive weights were active
        assert diffs["weights"] < 1e-4, diffs  # every metric incl. d_weight, vf_weight
        assert diffs["grads"] < 1e-5, diffs
        assert diffs["params"] < 1e-5, diffs
        assert diffs["buffers"] < 1e-6, diffs


def test_bf16_autocast_matches_unsharded_reference_under_autocast():
    # engine.precision=bf16-autocast: the FSDP2 parts under Engine.autocast() equal plain modules under
    # torch.autocast(bf16) bit for bit on one rank (a no-op engine autocast would differ from the bf16 reference).
    overrides = TINY16 + ["vavae.loss.disc_start=1", "engine.precision=bf16-autocast"]
    [(diffs, seen)] = run_distributed(_fsdp_vs_unsharded, world_size=1, args=(1, overrides))
    assert seen["d_weight"] > 0 and seen["vf_weight"] > 0, seen
    assert diffs == {"weights": 0.0, "grads": 0.0, "params": 0.0, "buffers": 0.0}, diffs
