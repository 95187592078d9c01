"""Benchmark: the generator's training throughput against the machine's matmul rate, and KV-cached sampling.

One run measures, on one device and dtype:

1. **dense matmul rate** (the baseline): best of several square ``n x n @ n x n`` matmuls (n = 2048 on a
   GPU, 1024 on the CPU) after a warm-up, ``2 n^3`` FLOPs each.
2. **training step**: build the aligned layout, forward, flow-matching loss, backward, gradient clipping
   (1.0) and an AdamW step of `UnimmGenerator` on a synthetic text-to-image batch (random normal latents,
   random text ids of exactly ``--text-tokens`` tokens, so no padding), as `unimm/trainer.py` does it.
   Its achieved FLOP/s is an analytic count divided by the median step time, and the ratio to the matmul
   rate is an MFU-like utilisation. The count (model FLOPs: recomputation under gradient checkpointing is
   not counted; norms, activations, RoPE, the optimizer and embedding look-ups are not counted):

       forward = 2 * N_backbone * B * L                       backbone matmul weights over every token
               + 2 * N_image * B * n                          latent projection + DDT head over image tokens
               + 2 * N_sample * B                             the two timestep MLPs, once per sample
               + 4 * layers * d_q * B * L^2                   backbone attention scores and values (QK^T, AV)
               + 4 * depth * W * B * n^2                      head attention among each image's tokens
       train   = 3 * forward                                  (backward = 2 x forward)

   with B the batch, L = text tokens + n the row length, n the image tokens, N_* the parameters of the
   ``nn.Linear`` weights touched (token embeddings excluded), d_q = heads x head_dim of the backbone (its
   hidden size), W the head width. The attention terms count the full L x L score matrix because the block
   mask is dense; ``3 * 4 = 12 * layers * d_q * L`` FLOPs per token, the usual attention term.
3. **sampling**: the same prompts and noise through an Euler loop of ``--steps`` steps, once with the full
   sequence every step (``forward``) and once with the text prefix encoded once (``encode_prefix``) and only
   the image tokens run per step (``forward_cached``), the two paths of ``UnimmPipeline(use_kv_cache=...)``
   without CFG (pass a doubled ``--batch`` to mimic CFG). Prints both times, the speed-up, the FLOP ratio
   the count predicts, and max |full - cached| of the final latents (0 or ~1e-6: same-length prompts leave no
   padding, and the CPU kernels then often agree bit for bit). The head's adaLN-Zero weights (zero at
   initialisation, which would make every velocity 0) are drawn at random so the comparison means something.

``--dtype bfloat16`` runs the generator under ``torch.autocast`` (fp32 master weights, as accelerate's bf16
mixed precision in the trainer) and the baseline matmul in bfloat16; float32 on CUDA uses the PyTorch
default (no TF32). Presets:

- ``tiny``: a 2-layer, 64-wide Qwen2 written by ``write_shapes_text_model`` into a temporary directory,
  a 256-wide 2-block DDT head, 32 x 8 x 8 latents; well under a minute on a 2-core CPU.
- ``mini``: the sizes of ``configs/t2i/mini-shapes.yaml`` (the default Shapes text model, 4 x 128, written
  into a temporary directory; the mini PS-VAE's 32 x 8 x 8 latents; batch 32, 48 text tokens, 25 steps).
- ``0.5b``: ``configs/t2i/t2i-0.5b.yaml``: the Qwen/Qwen2.5-0.5B architecture (random weights, from the
  hub cache or ``BACKBONE_CATALOG``), the 2048 x 2 DDT head, 96 x 16 x 16 latents, 128 text tokens; for GPUs.

Examples:

    OMP_NUM_THREADS=1 python scripts/bench_generator.py                      # tiny on the CPU
    python scripts/bench_generator.py --preset mini --threads 4
    python scripts/bench_generator.py --preset 0.5b --device cuda --dtype bfloat16 --batch 32
    python scripts/bench_generator.py --preset 0.5b --device cuda --dtype bfloat16 --gradient-checkpointing --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from unimm.flow import (
    euler_sample,
    flow_matching_loss,
    interpolate,
    sampling_timesteps,
    training_shift,
    training_timesteps,
)
from unimm.models.config import GeneratorModelConfig, HeadConfig
from unimm.models.generator import UnimmGenerator
from unimm.models.sequence import SampleSpec, build_layout


@dataclass
class Preset:
    channels: int
    grid: int  # latent height = width (patch size 1: one token per latent position)
    batch: int
    text_tokens: int
    steps: int


PRESETS = {
    "tiny": Preset(channels=32, grid=8, batch=8, text_tokens=16, steps=10),
    "mini": Preset(channels=32, grid=8, batch=32, text_tokens=48, steps=25),
    "0.5b": Preset(channels=96, grid=16, batch=32, text_tokens=128, steps=50),
}


def model_config(preset: str, workspace: str, attention: str) -> GeneratorModelConfig:
    """The generator config of a preset; tiny and mini write their Shapes text model into `workspace`."""
    from unimm.presets import load_generator_preset

    if preset == "0.5b":
        config = load_generator_preset("t2i-0.5b").model
    else:
        from data.shapes.text_model import ShapesTextModelConfig, write_shapes_text_model

        if preset == "tiny":
            text_model = ShapesTextModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               intermediate_size=192, corpus_scenes=50)
            config = GeneratorModelConfig(head=HeadConfig(hidden_size=256, depth=2, num_heads=4), timestep_frequency_size=128)
        else:
            text_model = ShapesTextModelConfig(corpus_scenes=500)  # the default sizes; a smaller corpus (only the vocabulary shrinks)
            config = load_generator_preset("mini-shapes").model
        config.backbone.name_or_path = str(write_shapes_text_model(workspace, text_model))
    config.backbone.pretrained = False
    config.backbone.attention = attention
    config.latent_channels = PRESETS[preset].channels
    return config


# ------------------------------------------------------------------------------------ FLOP counting
def linear_weights(module: nn.Module) -> int:
    return sum(child.weight.numel() for child in module.modules() if isinstance(child, nn.Linear))


def parameter_counts(model) -> dict[str, int]:
    """Matmul weights per token of the backbone, per image token, and per sample."""
    head = model.head
    per_sample = linear_weights(model.timestep_embedder) + linear_weights(head.timestep_embedder)
    return {
        "backbone": linear_weights(model.backbone.layers),
        "image": linear_weights(model.latent_projection) + linear_weights(head) - linear_weights(head.timestep_embedder),
        "sample": per_sample,
    }


def forward_flops(model, counts: dict, rows: int, queries: int, keys: int, image_tokens: int, prefix_only: bool = False) -> float:
    """One forward pass of `rows` sequences whose `queries` tokens attend to `keys` tokens (keys >= queries:
    a cached prefix). prefix_only: the text prefix alone (no latent embeddings, no head)."""
    backbone = model.backbone.config
    head_dim = getattr(backbone, "head_dim", None) or backbone.hidden_size // backbone.num_attention_heads
    d_q = backbone.num_attention_heads * head_dim
    flops = 2 * counts["backbone"] * rows * queries + 4 * backbone.num_hidden_layers * d_q * rows * queries * keys
    if not prefix_only:
        width, depth = model.head.config.hidden_size, model.head.config.depth
        flops += 2 * counts["image"] * rows * image_tokens + 2 * counts["sample"] * rows + 4 * depth * width * rows * image_tokens**2
    return float(flops)


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> tuple[float, float]:
    """(best seconds, FLOP/s) of one size x size matmul; several matmuls per timing when one is short."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    single = timed(lambda: a @ b, device)
    inner = max(1, min(50, int(0.05 / max(single, 1e-6))))  # at least ~50 ms per timing on fast devices

    def run():
        for _ in range(inner):
            a @ b

    best = min(timed(run, device) for _ in range(max(repeats, 3))) / inner
    return best, 2 * size**3 / best


def random_text(batch: int, length: int, vocab: int, generator: torch.Generator) -> list[list[int]]:
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, help="images per training step and prompts per sampling call (default: the preset's)")
    parser.add_argument("--text-tokens", type=int, help="text tokens per sample (default: the preset's)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each measurement (after a warm-up)")
    parser.add_argument("--matmul-size", type=int, help="side of the baseline matmul (default 2048 on cuda, 1024 on cpu)")
    parser.add_argument("--attention", choices=["sdpa", "eager", "flex_attention", "flash_attention_2"], default="sdpa")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the backbone layers in the training step")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU (default: OMP_NUM_THREADS / all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # autocast feeds bfloat16 into the float32 RMSNorm weights: a harmless "cannot dispatch to fused" notice
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    batch, text_tokens, steps = args.batch or preset.batch, args.text_tokens or preset.text_tokens, args.steps or preset.steps
    grid, repeats = (preset.grid, preset.grid), max(1, args.repeats)
    image_tokens, length = grid[0] * grid[1], text_tokens + grid[0] * grid[1]

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # 1. the baseline
    matmul_size = args.matmul_size or (2048 if device.type == "cuda" else 1024)
    matmul_seconds, peak = matmul_rate(device, dtype, matmul_size, repeats + 2)

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as workspace:
        config = model_config(args.preset, workspace, args.attention)
        model = UnimmGenerator.build(config, pretrained=False).to(device)
    with torch.no_grad():  # adaLN-Zero starts the head at zero velocity; random weights make the comparison meaningful
        for parameter in model.head.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(std=0.02)
    vocab = model.backbone.config.vocab_size
    counts = parameter_counts(model)
    total_parameters = sum(parameter.numel() for parameter in model.parameters())
    random = torch.Generator().manual_seed(args.seed)

    # 2. the training step
    model.train()
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    shift = training_shift(config.latent_channels, config.latent_patch_size)
    clean = torch.randn(batch, config.latent_channels, *grid, generator=random).to(device)
    noise = torch.randn(clean.shape, generator=random).to(device)
    t = training_timesteps(batch, shift, generator=random, device="cpu").to(device)
    texts = random_text(batch, text_tokens, vocab, random)

    def train_step() -> None:
        layout = build_layout([SampleSpec(ids) for ids in texts], grid).to(device)
        with autocast():
            velocity = model(layout, interpolate(clean, noise, t), t)
        loss = flow_matching_loss(velocity, clean, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
    train_times = [timed(train_step, device) for _ in range(repeats)]
    train_seconds = statistics.median(train_times)
    train_flops = 3 * forward_flops(model, counts, batch, length, length, image_tokens)
    optimizer.state.clear()  # free the moments before sampling
    model.zero_grad(set_to_none=True)
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_disable()

    # 3. sampling, full sequence vs KV cache
    model.eval()
    prompts = random_text(batch, text_tokens, vocab, random)
    start_noise = torch.randn(batch, config.latent_channels, *grid, generator=random).to(device)
    timesteps = sampling_timesteps(steps, 3.0, device=device)

    @torch.no_grad()
    def sample(use_cache: bool) -> torch.Tensor:
        layout = build_layout([SampleSpec(ids) for ids in prompts], grid).to(device)
        with autocast():
            if use_cache:
                prefix = model.encode_prefix(layout)
                velocity = lambda x, time_: model.forward_cached(layout, prefix, x, time_).float()  # noqa: E731
            else:
                velocity = lambda x, time_: model(layout, x, time_).float()  # noqa: E731
            return euler_sample(velocity, start_noise, timesteps)

    results = {}
    for use_cache in (False, True):  # warm-up
        results[use_cache] = sample(use_cache)
    sample_times = {False: [], True: []}
    for _ in range(repeats):  # interleaved, so background load hits both alike
        for use_cache in (False, True):
            sample_times[use_cache].append(timed(lambda cached=use_cache: results.__setitem__(cached, sample(cached)), device))
    full_seconds, cached_seconds = statistics.median(sample_times[False]), statistics.median(sample_times[True])
    difference = (results[False] - results[True]).abs().max().item()
    moved = (results[False] - start_noise).abs().max().item()  # how far sampling moved the latents: the scale of the result
    full_flops = steps * forward_flops(model, counts, batch, length, length, image_tokens)
    cached_flops = forward_flops(model, counts, batch, text_tokens, text_tokens, 0, prefix_only=True) + steps * forward_flops(
        model, counts, batch, image_tokens, length, image_tokens
    )

    # report
    backbone = model.backbone.config
    head = config.head
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})"
    print(f"preset {args.preset}: {args.device}{threads}, {args.dtype}{' (autocast)' if dtype != torch.float32 else ''}, attention {args.attention}")
    print(
        f"model: {total_parameters / 1e6:.2f} M parameters; backbone {backbone.num_hidden_layers} x {backbone.hidden_size} "
        f"({counts['backbone'] / 1e6:.2f} M matmul weights/token), head {head.depth} x {head.hidden_size} + latent projection "
        f"({counts['image'] / 1e6:.2f} M/image token), latents {config.latent_channels} x {grid[0]} x {grid[1]}"
    )
    print(f"batch {batch} x ({text_tokens} text + {image_tokens} image tokens) = {batch * length} tokens; sampling {steps} Euler steps, no CFG")
    print()
    print(f"{'measurement':<40} {'median s':>10} {'best s':>10} {'GFLOP':>10} {'GFLOP/s':>10} {'vs matmul':>10}")

    def row(name: str, seconds: float, best: float, flops: float) -> None:
        rate = flops / seconds
        print(f"{name:<40} {seconds:10.4f} {best:10.4f} {flops / 1e9:10.3f} {rate / 1e9:10.2f} {rate / peak:10.3f}")

    row(f"matmul {matmul_size}^3 {args.dtype} (baseline)", matmul_seconds, matmul_seconds, 2 * matmul_size**3)
    row("train step: fwd+bwd+clip+AdamW", train_seconds, min(train_times), train_flops)
    row(f"sampling, full sequence ({steps} steps)", full_seconds, min(sample_times[False]), full_flops)
    row(f"sampling, KV cache ({steps} steps)", cached_seconds, min(sample_times[True]), cached_flops)
    print()
    print(f"training MFU (achieved / measured matmul rate): {train_flops / train_seconds / peak:.3f}"
          f"{' (model FLOPs; checkpointing recomputes more)' if args.gradient_checkpointing else ''}")
    print(f"KV-cache speed-up: {full_seconds / cached_seconds:.2f}x (FLOP ratio {full_flops / cached_flops:.2f}x); "
          f"max |full - cached| = {difference:.2e} (max |x_0 - noise| = {moved:.2e})")


if __name__ == "__main__":
    main()
