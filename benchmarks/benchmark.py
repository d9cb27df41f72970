"""Throughput of DiT training and sampling, side by side for several speed settings.

  python -m benchmarks.benchmark --model DiT-S/2 --image-size 256 --batch-size 8 \
      --variants reference fp32 bf16 bf16+compile --e2e images:fp32 features:bf16 --json out.json

A variant is a precision (auto, fp32, tf32, bf16, fp16; `auto` is resolved on the device as
train.py resolves it) with optional `+` modifiers:
  compile     torch.compile the model
  plain-attn  attention written out as softmax(q k^T / sqrt(d)) v instead of the fused kernel
  loop-opt    AdamW and the EMA update as per-parameter Python loops
  ckpt        gradient checkpointing (recompute each block's activations in the backward pass)
`reference` is fp32+plain-attn+loop-opt: the original release's step.

Measured per variant, each in a fresh process (so peak memory and compile caches are its own):
  train   images/s of one optimizer step: forward + backward + AdamW + EMA, on random latents
  sample  images/s of DDPM-250 with classifier-free guidance, from the time of one denoising
          step (the mean over --sample-steps steps) times 250; with and without the VAE decode
With --e2e, train.py itself runs on a generated image folder (SOURCE:VARIANT, SOURCE being
`images`, encoded by the VAE at every step, or `features`, pre-extracted by
extract_features.py) and its own images/s is read from metrics.jsonl.

--find-max-batch first searches, per variant, the largest training batch that fits in
memory (doubling, then bisecting to a multiple of --batch-multiple) and measures training
there. --profile DIR writes a torch.profiler table of one training step per variant.
Every table and the JSON name the machine (CPU, its torch capability, native bf16, GPU and
compute capability, versions, threads); --out-dir (default $OUT when set) receives
benchmark.json and benchmark.md.

Timings are medians over --repeats runs after --warmup runs. On a GPU, model FLOPs
utilisation (MFU) counts 2 FLOPs per multiply-add of the forward pass (the paper's count:
118.6 GMACs per image for DiT-XL/2 at 256 px), 3 forward passes per training image, and
compares with the GPU's dense bf16 peak (--peak-tflops). The VAE is the Stable Diffusion
architecture with random weights unless --vae-path gives a real one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from diffusion import create_diffusion
from models import DiT_models

VARIANT_PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
MODIFIERS = ("compile", "plain-attn", "loop-opt", "ckpt")
SOURCES = ("images", "features")
SAMPLING_STEPS = 250
FID_SAMPLES = 50_000
# Dense (not sparse) bf16 tensor-core peaks in TFLOP/s, matched in this order against the
# GPU's name: the PCIe and NVL H100s are slower than the SXM one ("H100 80GB HBM3").
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("A10G", 125.0),
)
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def parse_variant(variant: str) -> dict:
    """'bf16+compile' -> {'precision': 'bf16', 'compile': True, ...}; 'reference' = fp32+plain-attn+loop-opt."""
    tokens = "fp32+plain-attn+loop-opt".split("+") if variant == "reference" else variant.split("+")
    precision, modifiers = tokens[0], set(tokens[1:])
    if precision not in VARIANT_PRECISIONS or not modifiers <= set(MODIFIERS):
        raise SystemExit(
            f"bad variant {variant!r}: a precision ({', '.join(VARIANT_PRECISIONS)}) then +modifiers among {', '.join(MODIFIERS)}"
        )
    return {"precision": precision, **{m: m in modifiers for m in MODIFIERS}}


# ----------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device) -> dict:
    """What the numbers were measured on: CPU, its vector instructions as torch dispatches
    them, native bf16, threads, the GPU and versions."""
    import diffusers

    from util.precision import cpu_has_native_bf16, has_native_bf16

    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            compute_capability=f"{major}.{minor}",
            gpu_native_bf16=has_native_bf16(device),
            gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def hardware_line(info: dict) -> str:
    """One line naming the machine, printed above every table."""
    native = {True: "native bf16", False: "no native bf16"}
    line = f"machine: CPU {info['cpu']} ({info['cpu_capability']}, {native[info['cpu_native_bf16']]}), {info['threads']} threads"
    if "gpu" in info:
        line += (
            f"; GPU {info['gpu']} (compute capability {info['compute_capability']}, {native[info['gpu_native_bf16']]}, "
            f"{info['gpu_memory_gib']} GiB), CUDA {info['cuda']}"
        )
    return line + f"; torch {info['torch']}, diffusers {info['diffusers']}"


def peak_tflops_of(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU known by name, else None."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in gpu_name), None)


# ----------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------

def forward_macs(model_name: str, image_size: int, num_classes: int = 1000) -> float:
    """Multiply-adds of one forward pass for one image (the paper's Gflops, Table 4)."""
    with torch.device("meta"):
        model = DiT_models[model_name](input_size=image_size // 8, num_classes=num_classes)
    tokens, width = model.pos_embed.shape[1], model.pos_embed.shape[2]
    p, depth = model.patch_size, len(model.blocks)
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    per_block = (
        tokens * (4 * width * width + 2 * width * mlp_hidden)  # qkv, proj, fc1, fc2
        + 2 * tokens * tokens * width  # q k^T and attn v
        + width * 6 * width  # adaLN modulation
    )
    embed = tokens * p * p * model.in_channels * width + 256 * width + width * width
    final = tokens * width * p * p * model.out_channels + width * 2 * width
    return float(depth * per_block + embed + final)


def train_mfu(images_per_s: float, macs: float, peak_tflops: float) -> float:
    """Training MFU: 2 FLOPs per multiply-add, forward + backward = 3 forward passes per image
    (recomputation by gradient checkpointing is not counted: it is not useful work)."""
    return images_per_s * 3 * 2 * macs / (peak_tflops * 1e12)


def sample_mfu(images_per_s: float, macs: float, peak_tflops: float) -> float:
    """Sampling MFU: SAMPLING_STEPS forward passes per image, each on 2 inputs (CFG)."""
    return images_per_s * SAMPLING_STEPS * 2 * 2 * macs / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------

def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn, after warm-up calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def update_ema_loop(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The per-parameter EMA update of the original release (for the `loop-opt` baseline)."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.mul_(decay).add_(param.detach(), alpha=1 - decay)


def build_model(args: argparse.Namespace, spec: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = DiT_models[args.model](
        input_size=args.image_size // 8, num_classes=args.num_classes, fused_attn=not spec["plain-attn"]
    ).to(device)
    # Random adaLN and output weights, so that no branch is trivially zero.
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and not param.any():
                param.normal_(0, 0.02)
    return model


def random_batch(args: argparse.Namespace, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    latent = args.image_size // 8
    return torch.randn(batch, 4, latent, latent, device=device), torch.randint(0, args.num_classes, (batch,), device=device)


def training_setup(args: argparse.Namespace, spec: dict, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A function running one training step (forward, backward, AdamW, EMA) on a batch."""
    from util.precision import grad_scaler
    from util.training import build_optimizer, compile_for_training, training_step, update_ema

    model = build_model(args, spec, device).train()
    model.set_grad_checkpointing(spec["ckpt"])
    ema = deepcopy(model).requires_grad_(False).eval()
    if spec["loop-opt"]:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, foreach=False)
        ema_update = update_ema_loop
    else:
        optimizer = build_optimizer(model, 1e-4)
        ema_update = update_ema
    forward = compile_for_training(model) if spec["compile"] else model
    diffusion = create_diffusion("")
    scaler = grad_scaler(spec["precision"], device)

    def step(latents: torch.Tensor, labels: torch.Tensor) -> None:
        training_step(forward, diffusion, optimizer, latents, labels, precision=spec["precision"], scaler=scaler)
        ema_update(ema, model, 0.9999)

    return step


def measure_train(args: argparse.Namespace, spec: dict, device: torch.device, variant: str) -> dict:
    step = training_setup(args, spec, device)
    latents, labels = random_batch(args, args.batch_size, device)
    times = timed(lambda: step(latents, labels), device, args.warmup, args.repeats)
    record = {
        "train_batch_size": args.batch_size,
        "train_step_s": float(np.median(times)),
        "train_images_per_s": args.batch_size / float(np.median(times)),
    }
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        path = os.path.join(args.profile, f"profile-{variant.replace('+', '_')}.txt")
        title = f"{args.model}, {args.image_size} px, batch {args.batch_size}, variant {variant}: one training step"
        profile_step(lambda: step(latents, labels), device, path, title)
        record["profile"] = path
    return record


def batch_fits(run: Callable[[int], None], batch: int) -> bool:
    """Whether run(batch) completes without running out of (GPU) memory."""
    try:
        run(batch)
        return True
    except torch.OutOfMemoryError:
        pass
    # Outside the except block the exception and its frames (holding activations) are gone.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return False


def largest_fitting_batch(fits: Callable[[int], bool], start: int, limit: int, multiple: int) -> int:
    """The largest batch, a multiple of `multiple` and at most `limit`, for which fits(batch)
    holds (assuming that it holds below some size and fails above): double from `start`
    until a batch fails, then bisect. Returns 0 when not even `multiple` fits."""
    lo, hi, batch = 0, limit + multiple, max(multiple, start // multiple * multiple)
    while batch <= limit:
        if not fits(batch):
            hi = batch
            break
        lo, batch = batch, batch * 2
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def find_max_batch(args: argparse.Namespace, spec: dict, device: torch.device) -> int:
    """The largest training batch that fits, each try being two steps: the second one holds the
    AdamW state and the previous gradients while it runs its forward pass."""
    step = training_setup(args, spec, device)

    def run(batch: int) -> None:
        latents, labels = random_batch(args, batch, device)
        for _ in range(2):
            step(latents, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return largest_fitting_batch(lambda batch: batch_fits(run, batch), args.batch_size, args.max_batch_limit, args.batch_multiple)


def profile_step(step: Callable[[], None], device: torch.device, path: str, title: str) -> None:
    """torch.profiler of one call of step: the share of device (or CPU) time by kind of op,
    then the ops taking the most time, written to path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    kind = "device" if device.type == "cuda" else "cpu"
    with open(path, "w") as f:
        f.write(f"{title}\n\n{time_by_kind(events, kind)}\n\n")
        f.write(events.table(sort_by=f"self_{kind}_time_total", row_limit=30))


# Op-name fragments that sort profiler events into kinds (the first match wins).
OP_KINDS = (
    ("attention", ("attention", "flash", "sdpa", "softmax")),
    ("matmul", ("mm", "matmul", "linear", "gemm", "conv")),
    ("optimizer", ("adam", "foreach")),
    ("norm", ("norm",)),
)


def time_by_kind(events, kind: str) -> str:
    """'self device time 123.4 ms: matmul 61%, ...' from profiler key averages."""
    totals: dict[str, float] = {}
    for event in events:
        self_us = getattr(event, f"self_{kind}_time_total", 0.0)
        name = event.key.lower()
        label = next((k for k, fragments in OP_KINDS if any(f in name for f in fragments)), "other")
        totals[label] = totals.get(label, 0.0) + self_us
    total = sum(totals.values()) or 1.0
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
    return f"self {kind} time {total / 1e3:.1f} ms: {shares}"


def measure_sample(args: argparse.Namespace, spec: dict, device: torch.device) -> dict:
    from util.sampling import compile_for_sampling, denoise

    model = build_model(args, spec, device).eval().requires_grad_(False)
    if spec["compile"]:
        compile_for_sampling(model)
    diffusion = create_diffusion(str(args.sample_steps))
    batch = args.sample_batch_size or args.batch_size
    z, y = random_batch(args, batch, device)

    def run() -> None:
        with torch.no_grad():
            denoise(model, diffusion, z, y, cfg_scale=4.0, precision=spec["precision"])

    times = timed(run, device, max(1, args.warmup // 2), max(2, args.repeats // 2))
    step_s = float(np.median(times)) / args.sample_steps
    return {"sample_batch_size": batch, "sample_step_s": step_s, "sample_images_per_s": batch / (SAMPLING_STEPS * step_s)}


def measure_decode(args: argparse.Namespace, device: torch.device) -> float:
    """Seconds to decode one latent with the (fp32) VAE, from a batch of at most 16."""
    from util.vae import decode

    vae = load_benchmark_vae(args, device)
    batch = min(16, args.sample_batch_size or args.batch_size)
    latent = args.image_size // 8
    z = torch.randn(batch, 4, latent, latent, device=device)
    return float(np.median(timed(lambda: decode(vae, z), device, 1, 3))) / batch


def load_benchmark_vae(args: argparse.Namespace, device: torch.device):
    """The VAE of --vae-path, else the SD-VAE architecture with random weights."""
    from diffusers.models import AutoencoderKL

    from util.vae import load_vae

    if args.vae_path:
        return load_vae("ema", device, args.vae_path)
    torch.manual_seed(0)
    return AutoencoderKL(**SD_VAE_CONFIG).to(device).eval()


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """Measure one variant in this process (called in a fresh child process)."""
    from util.precision import configure_precision, resolve_precision
    from util.training import peak_memory_mb

    spec = parse_variant(variant)
    device = torch.device(args.device)
    spec["precision"], note = resolve_precision(spec["precision"], device)  # `auto` as the scripts resolve it
    configure_precision(spec["precision"])
    record = {"variant": variant, **spec, "precision_note": note}
    if args.child_max_batch:
        return {**record, "max_batch": find_max_batch(args, spec, device), "peak_memory_mb": peak_memory_mb(device)}
    if "train" in args.measure:
        record.update(measure_train(args, spec, device, variant))
    if "sample" in args.measure:
        record.update(measure_sample(args, spec, device))
    record["peak_memory_mb"] = peak_memory_mb(device)
    return record


def run_in_child(variant: str, *extra: str) -> dict:
    """run_variant in a fresh process; a failure (out of memory, say) becomes an `error` record."""
    command = [sys.executable, "-m", "benchmarks.benchmark", *sys.argv[1:], *extra, "--child", variant]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "error": f"exit code {result.returncode}: {last}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_variant(args: argparse.Namespace, variant: str) -> dict:
    """One variant in fresh processes: with --find-max-batch, first the search, then the
    measurement at the batch found."""
    if not args.find_max_batch:
        return run_in_child(variant)
    search = run_in_child(variant, "--child-max-batch")
    if "error" in search or search["max_batch"] == 0:
        return {**search, "error": search.get("error", f"not even a batch of {args.batch_multiple} fits")}
    print(f"{variant}: largest training batch that fits: {search['max_batch']}", file=sys.stderr)
    record = run_in_child(variant, "--batch-size", str(search["max_batch"]))
    return {**record, "max_batch": search["max_batch"], "search_peak_memory_mb": search["peak_memory_mb"]}


# ----------------------------------------------------------------------------------------
# End to end: train.py on a generated image folder
# ----------------------------------------------------------------------------------------

def make_image_folder(root: str, count: int, image_size: int) -> None:
    """`count` random RGB images a little larger than image_size, in two class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = os.path.join(root, f"class_{i % 2}")
        os.makedirs(folder, exist_ok=True)
        h, w = rng.integers(image_size, image_size * 5 // 4, size=2)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))


def run_e2e(args: argparse.Namespace, workdir: str, vae_path: str, entry: str, batch: int) -> dict:
    source, variant = entry.split(":", 1)
    spec = parse_variant(variant)
    if source not in SOURCES or spec["loop-opt"]:
        raise SystemExit(f"bad --e2e entry {entry!r}: SOURCE:VARIANT with SOURCE in {SOURCES}, without loop-opt")
    results = os.path.join(workdir, f"results-{source}-{variant}")
    command = [
        sys.executable, os.path.join(REPO, "train.py"), "--model", args.model, "--image-size", str(args.image_size),
        "--num-classes", "2", "--global-batch-size", str(batch), "--vae-path", vae_path,
        "--num-workers", str(args.num_workers), "--precision", spec["precision"], "--results-dir", results,
        "--max-steps", str(args.e2e_steps), "--log-every", str(args.e2e_log_every), "--ckpt-every", str(10**9),
    ]
    command += ["--feature-path", os.path.join(workdir, "features")] if source == "features" else ["--data-path", os.path.join(workdir, "images")]
    command += ["--compile"] if spec["compile"] else []
    command += ["--attention", "plain"] if spec["plain-attn"] else []
    command += ["--grad-checkpointing"] if spec["ckpt"] else []
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        return {"e2e": entry, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    (run_dir,) = os.listdir(results)
    with open(os.path.join(results, run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steady = records[1:] or records  # the first log window holds warm-up and compilation
    return {
        "e2e": entry,
        "e2e_batch_size": batch,
        "e2e_images_per_s": float(np.median([r["images_per_sec"] for r in steady])),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
    }


def end_to_end(args: argparse.Namespace, batch: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as workdir:
        make_image_folder(os.path.join(workdir, "images"), max(args.e2e_images, batch), args.image_size)
        vae_path = args.vae_path
        if vae_path is None:
            vae_path = os.path.join(workdir, "vae")
            load_benchmark_vae(args, torch.device("cpu")).save_pretrained(vae_path)
        if any(entry.startswith("features:") for entry in args.e2e):
            subprocess.run(
                [sys.executable, os.path.join(REPO, "extract_features.py"), "--data-path", os.path.join(workdir, "images"),
                 "--feature-path", os.path.join(workdir, "features"), "--image-size", str(args.image_size),
                 "--vae-path", vae_path, "--batch-size", str(min(batch, 64)), "--num-workers", "0"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        return [run_e2e(args, workdir, vae_path, entry, batch) for entry in args.e2e]


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def add_derived(args: argparse.Namespace, records: list[dict], decode_s: float | None) -> None:
    """Sampling with the VAE decode, FID-50K hours, and on a GPU of known peak, MFU."""
    peak = args.peak_tflops
    if peak is None and args.device.startswith("cuda"):
        peak = peak_tflops_of(torch.cuda.get_device_name())
    macs = forward_macs(args.model, args.image_size, args.num_classes)
    for r in records:
        if "sample_step_s" in r and decode_s is not None:
            r["vae_decode_s_per_image"] = decode_s
            per_image_s = SAMPLING_STEPS * r["sample_step_s"] / r["sample_batch_size"] + decode_s
            r["sample_images_with_decode_per_s"] = 1 / per_image_s
            r["fid50k_hours"] = FID_SAMPLES * per_image_s / 3600
        if peak is None:
            continue
        r["peak_tflops"] = peak
        if "train_images_per_s" in r:
            r["train_mfu"] = train_mfu(r["train_images_per_s"], macs, peak)
        if "sample_images_per_s" in r:
            r["sample_mfu"] = sample_mfu(r["sample_images_per_s"], macs, peak)


def table_lines(args: argparse.Namespace, info: dict, records: list[dict], e2e: list[dict]) -> list[str]:
    ok = [r for r in records if "error" not in r]
    base = ok[0] if ok else {}
    lines = [
        hardware_line(info),
        f"{args.model}, {args.image_size} px, {args.device}; "
        f"{forward_macs(args.model, args.image_size, args.num_classes) / 1e9:.2f} GMACs forward per image",
        "",
        "| variant | train batch | train img/s | x first | sample img/s (DDPM-250, CFG) | +VAE decode | x first "
        "| FID-50K h | peak MB | MFU train / sample |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |")
            continue
        cells = [r["variant"] + (f" ({r['precision']})" if r["variant"].startswith("auto") else "")]
        if "train_images_per_s" in r:
            cells += [str(r["train_batch_size"]), f"{r['train_images_per_s']:.2f}", f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}x"]
        else:
            cells += ["", "", ""]
        if "sample_images_per_s" in r:
            cells += [
                f"{r['sample_images_per_s']:.4f}", f"{r.get('sample_images_with_decode_per_s', float('nan')):.4f}",
                f"{r['sample_images_per_s'] / base['sample_images_per_s']:.2f}x", f"{r.get('fid50k_hours', float('nan')):.2f}",
            ]
        else:
            cells += ["", "", "", ""]
        cells.append(f"{r['peak_memory_mb']:.0f}")
        cells.append(" / ".join(f"{r[k]:.1%}" for k in ("train_mfu", "sample_mfu") if k in r))
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({r["precision_note"] for r in ok if r.get("precision_note")})
    lines += [""] + notes if notes else []
    if e2e:
        lines += ["", "| train.py end to end | batch | img/s | x first | peak MB |", "|---|---|---|---|---|"]
        first = next((r for r in e2e if "error" not in r), None)
        for r in e2e:
            if "error" in r:
                lines.append(f"| {r['e2e']} | failed: {r['error']} |")
            else:
                ratio = r["e2e_images_per_s"] / first["e2e_images_per_s"]
                lines.append(f"| {r['e2e']} | {r['e2e_batch_size']} | {r['e2e_images_per_s']:.2f} | {ratio:.2f}x | {r['peak_memory_mb']:.0f} |")
    return lines


def write_report(args: argparse.Namespace, info: dict, records: list[dict], e2e: list[dict]) -> None:
    """The JSON (--json, and benchmark.json in --out-dir) and the table (benchmark.md there)."""
    report = {"hardware": info, "config": vars(args), "torch": torch.__version__, "variants": records, "e2e": e2e}
    paths = [args.json] if args.json else []
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        paths.append(os.path.join(args.out_dir, "benchmark.json"))
        with open(os.path.join(args.out_dir, "benchmark.md"), "w") as f:
            f.write("\n".join(table_lines(args, info, records, e2e)) + "\n")
    for path in paths:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(DiT_models), default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8, help="training images per step (the search's start with --find-max-batch)")
    parser.add_argument("--sample-batch-size", type=int, default=None, help="images per sampling batch, before CFG doubling (default: --batch-size)")
    parser.add_argument("--variants", nargs="*", default=["reference", "fp32", "bf16"])
    parser.add_argument("--measure", nargs="+", choices=["train", "sample"], default=["train", "sample"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=5, help="denoising steps timed per sampling run")
    parser.add_argument("--find-max-batch", action="store_true", help="measure training at the largest batch that fits")
    parser.add_argument("--max-batch-limit", type=int, default=4096, help="the search tries no batch above this")
    parser.add_argument("--batch-multiple", type=int, default=8, help="the search's resolution")
    parser.add_argument("--profile", default=None, metavar="DIR", help="write a torch.profiler table of one training step per variant here")
    parser.add_argument("--e2e", nargs="*", default=[], help="SOURCE:VARIANT runs of train.py, e.g. images:fp32 features:bf16")
    parser.add_argument("--e2e-batch-size", type=int, default=None, help="default: the first variant's training batch")
    parser.add_argument("--e2e-steps", type=int, default=30)
    parser.add_argument("--e2e-log-every", type=int, default=10)
    parser.add_argument("--e2e-images", type=int, default=64, help="size of the generated image folder (at least the batch)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers for --e2e runs")
    parser.add_argument("--vae-path", default=None, help="a real diffusers AutoencoderKL folder (default: random SD-VAE)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU (default: by its name)")
    parser.add_argument("--json", default=None, help="write all records to this file")
    parser.add_argument("--out-dir", default=os.environ.get("OUT"), help="write benchmark.json and benchmark.md here (default: $OUT)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-max-batch", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print(json.dumps(run_variant(args, args.child)))
        return
    for variant in args.variants:
        parse_variant(variant)  # fail on a typo before any measuring
    device = torch.device(args.device)
    info = hardware(device)
    print(hardware_line(info), file=sys.stderr)
    records: list[dict] = []
    for variant in args.variants:
        records.append(measure_variant(args, variant))
        write_report(args, info, records, [])  # partial results survive a run that is cut short
    decode_s = None
    if "sample" in args.measure and any("sample_step_s" in r for r in records):
        decode_s = measure_decode(args, device)
    add_derived(args, records, decode_s)
    write_report(args, info, records, [])
    e2e = []
    if args.e2e:
        trained = [r["train_batch_size"] for r in records if "train_batch_size" in r]
        e2e = end_to_end(args, args.e2e_batch_size or (trained[0] if trained else args.batch_size))
    print("\n" + "\n".join(table_lines(args, info, records, e2e)))
    write_report(args, info, records, e2e)


if __name__ == "__main__":
    main()
