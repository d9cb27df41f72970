"""Quick start: train a pixel-space DiT on scikit-learn's 8x8 digits with the real train.py and
watch a digit classifier recognise its samples as training goes on.

  python -m benchmarks.quickstart --out-dir DIR [--minutes 10] [--eval-every-seconds 60]

Steps: write DIR/digits (util.datasets, train split); time a few steps of train.py to set
--ckpt-every to about half of --eval-every-seconds; run train.py for --minutes (wall clock from
its launch, start-up included; SIGTERM at the end makes it save the step it is on), keeping
one checkpoint per --eval-every-seconds and deleting the others as they appear; then, for
every kept checkpoint, draw class-conditional samples from its EMA weights and score them.
Scored checkpoints other than the last are deleted (each is ~0.5 GB).

Score: an SVC fitted on the real training digits (8x8, values 0..16) classifies samples
reduced the same way (grey = mean of RGB, averaged down to 8x8, [-1, 1] -> 0..16). Accuracy is
the fraction of samples classified as the label they were drawn for; the relative score divides
it by the classifier's accuracy on the held-out real digits, so real test images score 1.

Outputs: quickstart.json (everything), quickstart.md (table and machine line), quickstart.png
(accuracy against training time) and samples.png (10 x 10, one row per class, last checkpoint).

Recipe, for 2 CPU cores: DiT-S/4 on the 8x8 digits themselves, in RGB pixels (--vae none, 3
channels): 4 tokens of 4x4 patches instead of DiT-S/2's 16, so the per-token layers do a
quarter of the work while attention still has a grid to mix (DiT-S/8 would be one token, an
MLP); 16 px would only repeat pixels at four times the tokens.
Batch 64 and lr 1e-3 (the paper's 1e-4 at batch 256 is for 1.28M ImageNet images and 400K
steps; here a run has a few hundred steps over 1,438 images). EMA 0.999 with warm-up
(decay min(0.999, (1+t)/(10+t))): 0.9999 would still be the initial weights after a few hundred
steps, the warm-up averages over the last tenth of the run. No flips: a mirrored 2 or 7 is no
digit. Sampling: DPM-Solver++(2M) in 20 steps, an eighth of DDPM-250's model calls (every
checkpoint is sampled, on the same 2 cores), with guidance 2 (the score counts samples of the
class asked for, which guidance trades diversity for).

  python -m benchmarks.quickstart --checkpoint CKPT --out-dir DIR  scores one checkpoint only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.benchmark import hardware, hardware_line
from models import DiT_models
from util.checkpoints import load_checkpoint
from util.datasets import load_digits_split, write_digits
from util.sampling import create_sampler, denoise

MODEL, IMAGE_SIZE, NUM_CLASSES = "DiT-S/4", 8, 10
TRAIN_FLAGS = [
    "--model", MODEL, "--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES), "--vae", "none",
    "--global-batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.999", "--ema-warmup", "--no-flip",
    "--num-workers", "0", "--precision", "fp32", "--epochs", "100000",
]
SAMPLER, SAMPLING_STEPS, CFG_SCALE = "dpm-solver++", 20, 2.0
CALIBRATION_STEPS = 6
GRID_PIXELS = 32  # each 8x8 sample is shown at 32x32 in samples.png
GRID_GAP, GRID_GAP_GREY = 4, 96  # pixels and grey level of the lines between digits


# ----------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------

def fit_digit_classifier():
    """An SVC on the real training digits, and its accuracy on the held-out ones."""
    from sklearn.svm import SVC

    train_images, train_labels, _ = load_digits_split("train")
    test_images, test_labels, _ = load_digits_split("test")
    classifier = SVC(gamma=0.001).fit(train_images.reshape(len(train_images), -1), train_labels)
    return classifier, float(classifier.score(test_images.reshape(len(test_images), -1), test_labels))


def digit_features(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (N, 64) grey 8x8 pixels in 0..16, as load_digits has them."""
    grey = images.float().clamp(-1, 1).mean(dim=1, keepdim=True)
    grey = torch.nn.functional.adaptive_avg_pool2d(grey, 8)
    return ((grey + 1) * 8).reshape(len(images), 64).numpy()


def score_samples(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of images the classifier assigns to the label they were drawn for."""
    return float(np.mean(classifier.predict(digit_features(images)) == labels.numpy()))


def real_digits_as_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of the real digits as train.py sees them (uint8 PNG values, RGB in [-1, 1])."""
    from util.datasets import digits_to_uint8

    images, labels, _ = load_digits_split(split)
    pixels = torch.from_numpy(digits_to_uint8(images)).float() / 127.5 - 1
    return pixels[:, None].repeat(1, 3, 1, 1), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------
# Sampling a checkpoint
# ----------------------------------------------------------------------------------------

def load_ema(path: str) -> tuple[torch.nn.Module, int]:
    """The EMA DiT of a train.py checkpoint and its step."""
    checkpoint = load_checkpoint(path)
    args = checkpoint["args"]
    model = DiT_models[args["model"]](input_size=args["image_size"], in_channels=3, num_classes=args["num_classes"])
    model.load_state_dict(checkpoint["ema"])
    return model.eval().requires_grad_(False), int(checkpoint["step"])


@torch.no_grad()
def sample_classes(model: torch.nn.Module, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class guided samples of every class (labels 0,0,..,1,1,..), the same noise each call."""
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, generator=generator)
    images = denoise(model, create_sampler(SAMPLING_STEPS, SAMPLER), z, labels, CFG_SCALE)
    return images.clamp(-1, 1), labels


# ----------------------------------------------------------------------------------------
# Training through train.py
# ----------------------------------------------------------------------------------------

def train_command(data_dir: str, results_dir: str, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", "--data-path", data_dir, "--results-dir", results_dir, *TRAIN_FLAGS, *extra]


def read_metrics(results_dir: str) -> list[dict]:
    records = []
    for root, _, files in os.walk(results_dir):
        if "metrics.jsonl" in files:
            with open(os.path.join(root, "metrics.jsonl")) as f:
                records += [json.loads(line) for line in f if line.strip()]
    return records


def steps_per_second(data_dir: str, scratch: str) -> float:
    """train.py's own speed over a few steps after the first (which warms up)."""
    command = train_command(data_dir, scratch, ["--max-steps", str(CALIBRATION_STEPS), "--log-every", "3", "--ckpt-every", "1000000"])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    rate = read_metrics(scratch)[-1]["steps_per_sec"]
    shutil.rmtree(scratch)  # its checkpoint is ~0.5 GB
    return rate


def train_for(data_dir: str, results_dir: str, seconds: float, ckpt_every: int, keep_every: float) -> tuple[float, float]:
    """Run train.py until `seconds` have passed, then stop it with SIGTERM (it saves that step).
    Checkpoints closer than `keep_every` seconds to the one kept before are deleted as they
    appear, so a slower or faster machine than measured never fills the disk. Returns
    (launch time, stop time)."""
    command = train_command(data_dir, results_dir, ["--ckpt-every", str(ckpt_every), "--log-every", str(max(1, ckpt_every // 4))])
    start = time.time()
    process = subprocess.Popen(command)
    kept: list[str] = []
    try:
        while process.poll() is None and time.time() - start < seconds:
            time.sleep(1)
            thin_checkpoints(results_dir, kept, start, keep_every)
    finally:  # also on an error or Ctrl-C here: train.py saves its step and exits
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait()
    stop = time.time()
    if process.returncode not in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
        raise SystemExit(f"train.py failed with exit code {process.returncode}; its log is in {results_dir}")
    return start, stop


def thin_checkpoints(results_dir: str, kept: list[str], start: float, keep_every: float) -> None:
    """Keep a new checkpoint only if it is `keep_every` seconds younger than the last one kept."""
    for path in checkpoints_of(results_dir):
        if path in kept:
            continue
        last = os.path.getmtime(kept[-1]) if kept else start
        if os.path.getmtime(path) - last >= 0.9 * keep_every:
            kept.append(path)
        else:
            os.remove(path)


def checkpoints_of(results_dir: str) -> list[str]:
    """train.py's checkpoints (NNNNNNN.pt; not the .tmp-*.pt being written), oldest first."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(results_dir) for name in names if name.removesuffix(".pt").isdigit()]
    return sorted(paths, key=lambda path: os.path.basename(path))


# ----------------------------------------------------------------------------------------
# Report: table, plot, grid
# ----------------------------------------------------------------------------------------

def write_table(rows: list[dict], machine: str, reference: float, path: str) -> None:
    lines = [
        f"{machine}", "",
        f"Digit classifier (SVC) on held-out real digits: {reference:.4f}", "",
        "| training s | steps | accuracy | relative score |", "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['seconds']:.0f} | {r['step']} | {r['accuracy']:.3f} | {r['relative']:.3f} |" for r in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def nice_step(span: float, ticks: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten that cuts `span` into about `ticks` parts."""
    raw = max(span, 1e-9) / ticks
    power = 10 ** np.floor(np.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def plot_series(xs: list[float], ys: list[float], path: str, title: str, xlabel: str, ylabel: str) -> None:
    """A line plot with axes and ticks, drawn with PIL (y from 0 to 1)."""
    width, height, left, right, top, bottom = 640, 400, 60, 20, 30, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x_max = max(max(xs, default=1.0), 1e-9)
    to_px = lambda x, y: (left + x / x_max * (width - left - right), height - bottom - y * (height - top - bottom))  # noqa: E731
    step = nice_step(x_max)
    for k in range(int(x_max / step) + 1):
        x, y = to_px(k * step, 0)
        draw.line([(x, y), (x, y + 5)], fill="black")
        draw.text((x - 8, y + 8), f"{k * step:g}", fill="black")
    for k in range(6):
        x, y = to_px(0, k / 5)
        draw.line([(x - 5, y), (x, y)], fill="black")
        draw.line([(x + 1, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((x - 30, y - 6), f"{k / 5:.1f}", fill="black")
    draw.line([to_px(0, 0), to_px(x_max, 0)], fill="black")  # axes over the grid lines
    draw.line([to_px(0, 0), to_px(0, 1)], fill="black")
    points = [to_px(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    draw.text((left, 8), title, fill="black")
    draw.text((width // 2 - 40, height - 20), xlabel, fill="black")
    draw.text((4, 8), ylabel, fill="black")
    image.save(path)


def save_digit_grid(images: torch.Tensor, rows: int, path: str) -> None:
    """(rows * cols, C, H, W) images in [-1, 1], one row per class, nearest-upscaled to GRID_PIXELS
    each, with a grey line between digits so that neighbours do not run into each other."""
    grey = ((images.clamp(-1, 1).mean(dim=1) + 1) * 127.5).round().to(torch.uint8).numpy()
    cols, side = len(grey) // rows, grey.shape[-1]
    scale = GRID_PIXELS // side
    cell = side * scale + GRID_GAP
    grid = np.full((rows * cell + GRID_GAP, cols * cell + GRID_GAP), GRID_GAP_GREY, dtype=np.uint8)
    for index, digit in enumerate(grey):
        top, left = GRID_GAP + (index // cols) * cell, GRID_GAP + (index % cols) * cell
        grid[top:top + side * scale, left:left + side * scale] = digit.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid).save(path)


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------

def score_checkpoints(paths: list[str], launch: float, per_class: int) -> tuple[list[dict], float, torch.Tensor]:
    classifier, reference = fit_digit_classifier()
    rows, last = [], None
    for index, path in enumerate(paths):
        model, step = load_ema(path)
        images, labels = sample_classes(model, per_class)
        accuracy = score_samples(classifier, images, labels)
        rows.append(dict(step=step, seconds=os.path.getmtime(path) - launch, accuracy=accuracy, relative=accuracy / reference, checkpoint=path))
        print(f"step {step}: {rows[-1]['seconds']:.0f} s of training, accuracy {accuracy:.3f} ({accuracy / reference:.3f} of real)", flush=True)
        if index < len(paths) - 1:
            os.remove(path)
        last = images
    return rows, reference, last


def time_to(rows: list[dict], fraction: float) -> float | None:
    """Training seconds of the first checkpoint reaching `fraction` of the best relative score."""
    best = max((r["relative"] for r in rows), default=0.0)
    return next((r["seconds"] for r in rows if r["relative"] >= fraction * best), None)


def save_class_rows(images: torch.Tensor, per_class: int, path: str) -> None:
    """samples.png: the first (up to) 10 samples of every class, one row per class."""
    shown = min(10, per_class)
    rows = images.reshape(NUM_CLASSES, per_class, *images.shape[1:])[:, :shown]
    save_digit_grid(rows.reshape(-1, *images.shape[1:]), NUM_CLASSES, path)


def score_one(checkpoint: str, out_dir: str, per_class: int) -> None:
    """Score one checkpoint and write out_dir/samples.png."""
    classifier, reference = fit_digit_classifier()
    model, step = load_ema(checkpoint)
    images, labels = sample_classes(model, per_class)
    accuracy = score_samples(classifier, images, labels)
    os.makedirs(out_dir, exist_ok=True)
    save_class_rows(images, per_class, os.path.join(out_dir, "samples.png"))
    print(f"step {step}: accuracy {accuracy:.3f}, {accuracy / reference:.3f} of real digits ({reference:.3f}); grid in {out_dir}/samples.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a pixel-space DiT on 8x8 digits and score its samples with a classifier.")
    parser.add_argument("--out-dir", required=True, help="a new or empty folder for the data, the run and the report")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time (wall clock, including start-up)")
    parser.add_argument("--eval-every-seconds", type=float, default=60.0, help="training time between scored checkpoints")
    parser.add_argument("--samples-per-class", type=int, default=20, help="samples scored per class and checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for training and sampling (default: torch's, all cores)")
    parser.add_argument("--checkpoint", default=None, help="score and draw this train.py checkpoint instead of training")
    args = parser.parse_args(argv)
    if args.threads is not None:  # train.py, a child process, reads OMP_NUM_THREADS
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.checkpoint is not None:
        return score_one(args.checkpoint, args.out_dir, args.samples_per_class)
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        raise SystemExit(f"--out-dir {args.out_dir} is not empty; choose a new folder")
    data_dir, results_dir = os.path.join(args.out_dir, "digits"), os.path.join(args.out_dir, "results")
    write_digits(data_dir, "train", IMAGE_SIZE)
    rate = steps_per_second(data_dir, os.path.join(args.out_dir, "calibration"))
    ckpt_every = max(1, round(rate * args.eval_every_seconds / 2))  # thin_checkpoints keeps about 1 in 2
    print(f"train.py runs {rate:.2f} steps/s here: a checkpoint every {ckpt_every} steps", flush=True)
    launch, stop = train_for(data_dir, results_dir, args.minutes * 60, ckpt_every, args.eval_every_seconds)
    write_report(args.out_dir, results_dir, launch, stop, rate, args.samples_per_class)


def write_report(out_dir: str, results_dir: str, launch: float, stop: float, rate: float, per_class: int) -> None:
    """Score the checkpoints in results_dir and write the json, table, plot and sample grid."""
    rows, reference, images = score_checkpoints(checkpoints_of(results_dir), launch, per_class)
    info = hardware(torch.device("cpu"))
    machine = hardware_line(info)
    report = dict(
        machine=info, machine_line=machine, recipe=TRAIN_FLAGS, sampler=SAMPLER, sampling_steps=SAMPLING_STEPS,
        cfg_scale=CFG_SCALE, samples_per_class=per_class, reference_accuracy=reference,
        steps_per_sec=rate, training_seconds=stop - launch, rows=rows, seconds_to_90_percent=time_to(rows, 0.9),
    )
    with open(os.path.join(out_dir, "quickstart.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_table(rows, machine, reference, os.path.join(out_dir, "quickstart.md"))
    plot_series([r["seconds"] for r in rows], [r["relative"] for r in rows], os.path.join(out_dir, "quickstart.png"),
                f"{MODEL} on 8x8 digits: samples recognised, relative to real digits", "training seconds", "score")
    save_class_rows(images, per_class, os.path.join(out_dir, "samples.png"))
    with open(os.path.join(out_dir, "quickstart.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
