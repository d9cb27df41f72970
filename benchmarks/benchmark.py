"""Throughput of DiT training and sampling, side by side for several speed settings.

  python benchmarks/benchmark.py --model DiT-S/2 --image-size 256 --batch-size 8 \
      --variants reference fp32 bf16 bf16+compile --e2e images:fp32 features:bf16 --json out.json

A variant is a precision (fp32, tf32, bf16) with optional `+` modifiers:
  compile     torch.compile the model
  plain-attn  attention written out as softmax(q k^T / sqrt(d)) v instead of the fused kernel
  loop-opt    AdamW and the EMA update as per-parameter Python loops
`reference` is fp32+plain-attn+loop-opt: the original release's step.

Measured per variant, each in a fresh process (so peak memory and compile caches are its own):
  train   images/s of one optimizer step: forward + backward + AdamW + EMA, on random latents
  sample  images/s of DDPM-250 with classifier-free guidance, from the time of one denoising
          step (the mean over --sample-steps steps) times 250; with and without the VAE decode
With --e2e, train.py itself runs on a generated image folder (SOURCE:VARIANT, SOURCE being
`images`, encoded by the VAE at every step, or `features`, pre-extracted by
extract_features.py) and its own images/s is read from metrics.jsonl.

Timings are medians over --repeats runs after --warmup runs. On a GPU, model FLOPs
utilisation (MFU) counts 2 FLOPs per multiply-add of the forward pass (the paper's count:
118.6 GMACs per image for DiT-XL/2 at 256 px), 3 forward passes per training image, and
compares with the GPU's dense bf16 peak (--peak-tflops). The VAE is the Stable Diffusion
architecture with random weights unless --vae-path gives a real one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from copy import deepcopy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402

MODIFIERS = ("compile", "plain-attn", "loop-opt")
SOURCES = ("images", "features")
SAMPLING_STEPS = 250
# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name, used for MFU.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def parse_variant(variant: str) -> dict:
    """'bf16+compile' -> {'precision': 'bf16', 'compile': True, ...}; 'reference' = fp32+plain-attn+loop-opt."""
    tokens = "fp32+plain-attn+loop-opt".split("+") if variant == "reference" else variant.split("+")
    precision, modifiers = tokens[0], set(tokens[1:])
    if precision not in ("fp32", "tf32", "bf16") or not modifiers <= set(MODIFIERS):
        raise SystemExit(f"bad variant {variant!r}: a precision (fp32, tf32, bf16) then +modifiers among {', '.join(MODIFIERS)}")
    return {"precision": precision, **{m: m in modifiers for m in MODIFIERS}}


def forward_macs(model_name: str, image_size: int, num_classes: int = 1000) -> float:
    """Multiply-adds of one forward pass for one image (the paper's FLOP count)."""
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


def measure_train(args: argparse.Namespace, spec: dict, device: torch.device) -> dict:
    from train import build_optimizer, compile_for_training, training_step, update_ema

    model = build_model(args, spec, device).train()
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
    latent = args.image_size // 8
    latents = torch.randn(args.batch_size, 4, latent, latent, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def step() -> None:
        training_step(forward, diffusion, optimizer, latents, labels, precision=spec["precision"])
        ema_update(ema, model, 0.9999)

    times = timed(step, device, args.warmup, args.repeats)
    return {"train_step_s": float(np.median(times)), "train_images_per_s": args.batch_size / float(np.median(times))}


def measure_sample(args: argparse.Namespace, spec: dict, device: torch.device) -> dict:
    from sampling import compile_for_sampling, denoise

    model = build_model(args, spec, device).eval().requires_grad_(False)
    if spec["compile"]:
        compile_for_sampling(model)
    diffusion = create_diffusion(str(args.sample_steps))
    latent = args.image_size // 8
    z = torch.randn(args.batch_size, 4, latent, latent, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def run() -> None:
        with torch.no_grad():
            denoise(model, diffusion, z, y, cfg_scale=4.0, precision=spec["precision"])

    times = timed(run, device, max(1, args.warmup // 2), max(2, args.repeats // 2))
    step_s = float(np.median(times)) / args.sample_steps
    return {"sample_step_s": step_s, "sample_images_per_s": args.batch_size / (SAMPLING_STEPS * step_s)}


def measure_decode(args: argparse.Namespace, device: torch.device) -> float:
    """Seconds to decode one batch of latents with the (fp32) VAE."""
    from vae import decode

    vae = load_benchmark_vae(args, device)
    latent = args.image_size // 8
    z = torch.randn(args.batch_size, 4, latent, latent, device=device)
    return float(np.median(timed(lambda: decode(vae, z), device, 1, 3)))


def load_benchmark_vae(args: argparse.Namespace, device: torch.device):
    """The VAE of --vae-path, else the SD-VAE architecture with random weights."""
    from diffusers.models import AutoencoderKL

    from vae import load_vae

    if args.vae_path:
        return load_vae("ema", device, args.vae_path)
    torch.manual_seed(0)
    return AutoencoderKL(**SD_VAE_CONFIG).to(device).eval()


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """Measure one variant in this process (called in a fresh child process)."""
    from precision import configure_precision
    from train import peak_memory_mb

    spec = parse_variant(variant)
    device = torch.device(args.device)
    configure_precision(spec["precision"])
    record = {"variant": variant, **spec}
    if "train" in args.measure:
        record.update(measure_train(args, spec, device))
    if "sample" in args.measure:
        record.update(measure_sample(args, spec, device))
    record["peak_memory_mb"] = peak_memory_mb(device)
    return record


def run_in_child(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, *sys.argv[1:]]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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


def run_e2e(args: argparse.Namespace, workdir: str, vae_path: str, entry: str) -> dict:
    source, variant = entry.split(":", 1)
    spec = parse_variant(variant)
    if source not in SOURCES or spec["loop-opt"]:
        raise SystemExit(f"bad --e2e entry {entry!r}: SOURCE:VARIANT with SOURCE in {SOURCES}, without loop-opt")
    results = os.path.join(workdir, f"results-{source}-{variant}")
    command = [
        sys.executable, os.path.join(REPO, "train.py"), "--model", args.model, "--image-size", str(args.image_size),
        "--num-classes", "2", "--global-batch-size", str(args.batch_size), "--vae-path", vae_path,
        "--num-workers", str(args.num_workers), "--precision", spec["precision"], "--results-dir", results,
        "--max-steps", str(args.e2e_steps), "--log-every", str(args.e2e_log_every), "--ckpt-every", str(10**9),
    ]
    command += ["--feature-path", os.path.join(workdir, "features")] if source == "features" else ["--data-path", os.path.join(workdir, "images")]
    if spec["compile"]:
        command.append("--compile")
    if spec["plain-attn"]:
        command += ["--attention", "plain"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_dir,) = os.listdir(results)
    with open(os.path.join(results, run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steady = records[1:] or records  # the first log window holds warm-up and compilation
    return {
        "e2e": entry,
        "e2e_images_per_s": float(np.median([r["images_per_sec"] for r in steady])),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
    }


def end_to_end(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as workdir:
        make_image_folder(os.path.join(workdir, "images"), args.e2e_images, args.image_size)
        vae_path = args.vae_path
        if vae_path is None:
            vae_path = os.path.join(workdir, "vae")
            load_benchmark_vae(args, torch.device("cpu")).save_pretrained(vae_path)
        if any(entry.startswith("features:") for entry in args.e2e):
            subprocess.run(
                [sys.executable, os.path.join(REPO, "extract_features.py"), "--data-path", os.path.join(workdir, "images"),
                 "--feature-path", os.path.join(workdir, "features"), "--image-size", str(args.image_size),
                 "--vae-path", vae_path, "--batch-size", str(args.batch_size), "--num-workers", "0"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        return [run_e2e(args, workdir, vae_path, entry) for entry in args.e2e]


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def add_mfu(args: argparse.Namespace, records: list[dict]) -> None:
    if not args.device.startswith("cuda"):
        return
    peak = args.peak_tflops
    if peak is None:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        return
    macs = forward_macs(args.model, args.image_size, args.num_classes)
    for r in records:
        if "train_images_per_s" in r:
            r["train_mfu"] = r["train_images_per_s"] * 3 * 2 * macs / (peak * 1e12)
        if "sample_images_per_s" in r:  # CFG runs the model on 2 inputs per image and step
            r["sample_mfu"] = r["sample_images_per_s"] * SAMPLING_STEPS * 2 * 2 * macs / (peak * 1e12)


def print_table(args: argparse.Namespace, records: list[dict], e2e: list[dict]) -> None:
    base = records[0] if records else None
    print(f"\n{args.model}, {args.image_size} px, batch {args.batch_size}, {args.device}; "
          f"{forward_macs(args.model, args.image_size, args.num_classes) / 1e9:.2f} GMACs forward per image")
    print("| variant | train img/s | x first | sample img/s (DDPM-250, CFG) | +VAE decode | x first | peak MB | MFU train / sample |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        cells = [r["variant"]]
        if "train_images_per_s" in r:
            cells += [f"{r['train_images_per_s']:.2f}", f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}x"]
        else:
            cells += ["", ""]
        if "sample_images_per_s" in r:
            cells += [
                f"{r['sample_images_per_s']:.4f}", f"{r['sample_images_with_decode_per_s']:.4f}",
                f"{r['sample_images_per_s'] / base['sample_images_per_s']:.2f}x",
            ]
        else:
            cells += ["", "", ""]
        cells.append(f"{r['peak_memory_mb']:.0f}")
        mfu = [f"{r[k]:.1%}" for k in ("train_mfu", "sample_mfu") if k in r]
        cells.append(" / ".join(mfu))
        print("| " + " | ".join(cells) + " |")
    if e2e:
        print("\n| train.py end to end | img/s | x first | peak MB |\n|---|---|---|---|")
        for r in e2e:
            print(f"| {r['e2e']} | {r['e2e_images_per_s']:.2f} | {r['e2e_images_per_s'] / e2e[0]['e2e_images_per_s']:.2f}x | {r['peak_memory_mb']:.0f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(DiT_models), default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (sampling: before CFG doubling)")
    parser.add_argument("--variants", nargs="*", default=["reference", "fp32", "bf16"])
    parser.add_argument("--measure", nargs="+", choices=["train", "sample"], default=["train", "sample"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=5, help="denoising steps timed per sampling run")
    parser.add_argument("--e2e", nargs="*", default=[], help="SOURCE:VARIANT runs of train.py, e.g. images:fp32 features:bf16")
    parser.add_argument("--e2e-steps", type=int, default=30)
    parser.add_argument("--e2e-log-every", type=int, default=10)
    parser.add_argument("--e2e-images", type=int, default=64, help="size of the generated image folder")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers for --e2e runs")
    parser.add_argument("--vae-path", default=None, help="a real diffusers AutoencoderKL folder (default: random SD-VAE)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    parser.add_argument("--json", default=None, help="write all records to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print(json.dumps(run_variant(args, args.child)))
        return
    for variant in args.variants:
        parse_variant(variant)  # fail on a typo before any measuring
    records = [run_in_child(args, variant) for variant in args.variants]
    if "sample" in args.measure and records:
        decode_s = measure_decode(args, torch.device(args.device))
        for r in records:
            r["vae_decode_s"] = decode_s
            r["sample_images_with_decode_per_s"] = args.batch_size / (SAMPLING_STEPS * r["sample_step_s"] + decode_s)
    add_mfu(args, records)
    e2e = end_to_end(args) if args.e2e else []
    print_table(args, records, e2e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__, "variants": records, "e2e": e2e}, f, indent=1)


if __name__ == "__main__":
    main()
