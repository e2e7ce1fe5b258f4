"""Extraction throughput benchmark: img/s of tokenizer encode (both flips) + DINOv2 features, with FLOPs and MFU.

    python tools/bench_extract.py                       # tiny on CPU: a tiny random VA-VAE (32 px) + a tiny ViT
    python tools/bench_extract.py --tokenizer-kwargs '{"random_init": true}' --image-size 256 \\
        --features-model vit_large_patch14_dinov2.lvd142m --features-model-kwargs '{}' \\
        --batch 64 128 --precision tf32 bf16 --modes eager compiled --pipeline 5000 --num-workers 12
                                                        # f16d32 (random weights) + DINOv2-L/14, as the real job

"network" rows time exactly the per-batch work of the extraction job (``data/extract.py``): the tokenizer
(``data.tokenizers.build_tokenizer``) encodes ``cat([x, hflip(x)])`` with a posterior sample, and
``build_features`` (DINOv2 patch tokens on the latent grid) runs on ``x``, under ``torch.inference_mode``, on
random images already on the device: this is the GPU's capacity for those networks. The optional
"pipeline" row runs the real extraction job (``data.extract.extract``: DataLoader workers, host-to-device
copies, MDS writing) on ``--pipeline N`` synthetic images (or ``--pipeline-folder DIR``) and reports
images / wall time, including the job's start-up, and its ratio to the network row of the same settings
(the job runs fp32 with TF32, i.e. the ``tf32`` rows; target >= 0.8).

Method: ``--warmup`` untimed batches first (compilation, cuDNN autotuning), then ``--repeats`` timed batches
between ``torch.cuda.synchronize()``; img/s counts source images (each is encoded twice). FLOPs are counted,
not guessed: ``torch.utils.flop_counter.FlopCounterMode`` over one eager batch with the math attention
backend (convolutions, matmuls, attention as matmuls; element-wise work is not counted), split into the
tokenizer (both flips) and DINOv2 per image.
MFU = img/s * FLOP/img / ``core.metrics.peak_flops`` (vendor dense bf16 peak, for every precision row).
Weights are random (``features.random_init``; the tokenizer as its kwargs say): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.metrics import bench_threads, format_table, peak_flops
from data.extract import ExtractConfig, FeaturesConfig, SourceConfig, TokenizerConfig, build_features, extract
from data.tokenizers import available_tokenizers, build_tokenizer

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}
# configs/tiny_vavae.yaml's autoencoder (random weights): 32 px images -> 4 x 16 x 16 latents.
TINY_VAVAE = {
    "random_init": True,
    "embed_dim": 4,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
    "z_channels": 4,
    "resolution": 32,
}
PRECISIONS = ("fp32", "tf32", "bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="vavae", help=f"data.tokenizers kind ({', '.join(available_tokenizers())})")
    p.add_argument(
        "--tokenizer-kwargs",
        default=json.dumps(TINY_VAVAE),
        help="JSON keyword arguments for build_tokenizer (default: a tiny random VA-VAE; "
        "'{\"random_init\": true}' = f16d32 with random weights; '{\"checkpoint\": PATH}' = released)",
    )
    p.add_argument(
        "--no-sample",
        action="store_true",
        help="encode to the posterior mean (default: a sample, as the official extraction)",
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--no-features", action="store_true", help="tokenizer only (no DINOv2 features)")
    p.add_argument(
        "--features-model",
        default="vit_small_patch14_dinov2",
        help="timm name (default: a tiny random ViT; the real one is vit_large_patch14_dinov2.lvd142m)",
    )
    p.add_argument(
        "--features-model-kwargs",
        default=json.dumps(TINY_VIT),
        help="JSON timm.create_model kwargs (default: the tiny test ViT; pass '{}' for the real size)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[4], help="source images per batch")
    p.add_argument(
        "--precision",
        nargs="+",
        default=None,
        choices=PRECISIONS,
        help="fp32 (TF32 off), tf32 (the job's setting on CUDA), bf16 (autocast); default: fp32 on CPU, "
        "tf32 and bf16 on CUDA",
    )
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    p.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, aot_eager on CPU")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--pipeline",
        type=int,
        default=0,
        metavar="N",
        help="also run the real extraction job on N synthetic images (0 = off)",
    )
    p.add_argument("--pipeline-folder", default=None, help="run the job on this ImageNet-style folder instead")
    p.add_argument("--num-workers", type=int, default=0, help="pipeline: DataLoader workers")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default on CPU: 1; tiny models are dominated by per-op overhead and "
        "extra threads only add synchronisation, badly so on a shared machine)",
    )
    return p.parse_args(argv)


class ExtractStep(torch.nn.Module):
    """One extraction batch: tokenizer latents of x and hflip(x), and DINOv2 features of x (the job's work)."""

    def __init__(self, tokenizer, features, sample: bool):
        super().__init__()
        self.tokenizer, self.features, self.sample = tokenizer, features, sample

    def forward(self, x: torch.Tensor, generator=None):
        z = self.tokenizer.encode(torch.cat([x, torch.flip(x, dims=[-1])]), sample=self.sample, generator=generator)
        f = self.features(x) if self.features is not None else None
        return z, f


def _precision_ctx(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def count_flops(step: ExtractStep, x: torch.Tensor) -> tuple[float, float]:
    """(tokenizer FLOPs, DINOv2 FLOPs) per source image, counted with FlopCounterMode over one eager batch."""
    n = x.shape[0]
    # The math SDPA backend decomposes attention into matmuls, which FlopCounterMode counts on every device
    # (it has no formula for some fused kernels, e.g. the CPU flash kernel).
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            step.tokenizer.encode(torch.cat([x, torch.flip(x, dims=[-1])]), sample=step.sample)
        tok = counter.get_total_flops()
        feat = 0
        if step.features is not None:
            with FlopCounterMode(display=False) as counter:
                step.features(x)
            feat = counter.get_total_flops()
    return tok / n, feat / n


def bench_network(step, mode, precision, batch, device, args, backend, flops) -> dict:
    g = torch.Generator(device="cpu").manual_seed(args.seed + batch)
    x = (torch.rand(batch, 3, args.image_size, args.image_size, generator=g) * 2 - 1).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    torch._dynamo.reset()
    fn = torch.compile(step, backend=backend, dynamic=False) if mode == "compiled" else step
    cuda = device.type == "cuda"
    _set_tf32(precision == "tf32")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), _precision_ctx(precision, device):
        for _ in range(args.warmup):
            fn(x, gen)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn(x, gen)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    tok, feat = flops
    img_s = batch * args.repeats / elapsed
    peak = peak_flops(device)
    return {
        "what": "network",
        "mode": mode,
        "precision": precision,
        "batch": batch,
        "img/s": img_s,
        "ms/batch": 1000 * elapsed / args.repeats,
        "tok GFLOP/img": tok / 1e9,
        "dino GFLOP/img": feat / 1e9,
        "MFU": img_s * (tok + feat) / peak if peak else float("nan"),
        "peak mem GiB": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "vs network": float("nan"),
    }


def bench_pipeline(args, batch, device, features_cfg, flops, network_rows) -> dict:
    """The real extraction job on a synthetic source (or a folder) into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        if args.pipeline_folder:
            source = SourceConfig(kind="folder", path=args.pipeline_folder, image_size=args.image_size)
        else:
            source = SourceConfig(
                kind="synthetic", num_samples=args.pipeline, image_size=args.image_size, num_classes=10, seed=args.seed
            )
        cfg = ExtractConfig(
            out_dir=tmp,
            source=source,
            tokenizer=TokenizerConfig(
                kind=args.tokenizer, sample=not args.no_sample, kwargs=json.loads(args.tokenizer_kwargs)
            ),
            features=features_cfg,
            batch_size=batch,
            num_workers=args.num_workers,
            chunk_size=max(1000, batch),
            device=device.type,
            seed=args.seed,
            tf32=True,
            progress_bar=False,
        )
        result = extract(cfg)
    precision = "tf32" if device.type == "cuda" else "fp32"
    img_s = result.num_samples / result.elapsed_s
    ref = [r for r in network_rows if r["mode"] == "eager" and r["precision"] == precision and r["batch"] == batch]
    tok, feat = flops
    peak = peak_flops(device)
    return {
        "what": "pipeline",
        "mode": "eager",
        "precision": precision,
        "batch": batch,
        "img/s": img_s,
        "ms/batch": 1000 * batch / img_s,
        "tok GFLOP/img": tok / 1e9,
        "dino GFLOP/img": feat / 1e9,
        "MFU": img_s * (tok + feat) / peak if peak else float("nan"),
        "peak mem GiB": float("nan"),
        "vs network": img_s / ref[0]["img/s"] if ref else float("nan"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with bench_threads(device, args.threads):
        return _run(args, device)


def _run(args, device: torch.device) -> int:
    cuda = device.type == "cuda"
    precisions = args.precision or (["tf32", "bf16"] if cuda else ["fp32"])
    backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args.tokenizer, **json.loads(args.tokenizer_kwargs)).to(device).eval()
    latent_shape = tokenizer.latent_shape(args.image_size)
    features_cfg = FeaturesConfig(
        enabled=not args.no_features,
        model=args.features_model,
        random_init=True,
        model_kwargs=json.loads(args.features_model_kwargs),
    )
    features = build_features(features_cfg, latent_shape[1:]).to(device) if features_cfg.enabled else None
    step = ExtractStep(tokenizer, features, sample=not args.no_sample).eval()
    rows = []
    for b in args.batch:
        x = (torch.rand(b, 3, args.image_size, args.image_size) * 2 - 1).to(device)
        flops = count_flops(step, x)
        for p in precisions:
            for m in args.modes:
                rows.append(bench_network(step, m, p, b, device, args, backend, flops))
        if args.pipeline or args.pipeline_folder:
            rows.append(bench_pipeline(args, b, device, features_cfg, flops, rows))
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    feat = f"{args.features_model} {args.features_model_kwargs}" if features is not None else "none"
    print(
        f"tokenizer {args.tokenizer} {args.tokenizer_kwargs} (latent {tuple(latent_shape)}), features {feat}, "
        f"image {args.image_size}px, device {dev_name}, torch {torch.__version__}, compile backend {backend}; "
        f"{args.repeats} timed batch(es) after {args.warmup} warm-up"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
