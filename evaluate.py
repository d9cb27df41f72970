"""Score a sample batch against a reference batch as ADM's evaluator does, in PyTorch.

  python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0.npz
  python evaluate.py REF.npz SAMPLE.npz --save-activations --json scores.json   # also writes REF_inception.npz, ...
  python evaluate.py REF_inception.npz SAMPLE_inception.npz                     # activation files: seconds

The metrics are those of the DiT paper's ImageNet tables: Inception Score, FID, sFID, precision and recall,
computed as ADM's evaluator computes them (Dhariwal & Nichol 2021; openai/guided-diffusion,
evaluations/evaluator.py). The network is torch-fidelity's port of the TF Inception-v3 graph of
2015-12-05 that ADM loads, with TF-1 bilinear resizing of the 8-bit images inside the network.

Each input is an image batch (.npz with arr_0: N x H x W x 3 uint8, what sample_ddp.py writes and
what ADM's reference batches hold) or an activation file (.npz with pool N x 2048, spatial N x 2023
and softmax N x 1008, float32). Either may also hold mu, sigma, mu_s, sigma_s: as in ADM, those are
then used for FID and sFID instead of statistics of its activations.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as WEIGHTS_URL
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from tqdm.auto import tqdm

from util.files import atomic_open
from util.flags import make_parser
from util.distributed import default_device
from util.precision import configure_precision

POOL_DIM, SOFTMAX_DIM = 2048, 1008
# sFID: the first 7 channels of the 17 x 17 map `mixed_6/conv`, flattened in (H, W, C) order.
SPATIAL_SIZE, SPATIAL_CHANNELS = 17, 7
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
ACTIVATION_DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "softmax": SOFTMAX_DIM}
STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
IS_SPLIT_SIZE = 5000  # ADM's (and improved-GAN's) Inception Score splits
NEIGHBOURHOOD = 3  # k of the k-NN balls of precision and recall (Kynkaanniemi et al. 2019)
DISTANCE_BLOCK = 10000  # ADM's row and column batch: its float16 overflow check is per block, so it is ours
ACTIVATION_SUFFIX = "_inception.npz"

WEIGHTS_FILE = os.path.basename(WEIGHTS_URL)


@dataclass
class Activations:
    pool: np.ndarray  # (N, 2048) float32: pool_3, for FID, precision and recall
    spatial: np.ndarray  # (N, 2023) float32: mixed_6/conv[..., :7], for sFID
    softmax: np.ndarray  # (N, 1008) float32: the 1008-way softmax, for the Inception Score
    stats: dict[str, np.ndarray] | None = None  # stored mu, sigma, mu_s, sigma_s


# ---------------------------------------------------------------- input files


def open_npz(path: str) -> np.lib.npyio.NpzFile:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz file ({error})") from None


def read_stats(path: str, npz: np.lib.npyio.NpzFile) -> dict[str, np.ndarray] | None:
    """The stored FID statistics, all four or none."""
    present = [key for key in STAT_SHAPES if key in npz.files]
    if not present:
        return None
    missing = [key for key in STAT_SHAPES if key not in npz.files]
    if missing:
        raise ValueError(f"{path} holds {', '.join(present)} but not {', '.join(missing)}: FID statistics need all four")
    stats = {key: npz[key] for key in STAT_SHAPES}
    for key, shape in STAT_SHAPES.items():
        if stats[key].shape != shape or not np.issubdtype(stats[key].dtype, np.floating):
            raise ValueError(f"{path}: {key} must be a float array of shape {shape}, got {stats[key].dtype} {stats[key].shape}")
    check_finite(path, stats)
    return stats


def check_finite(source: str, arrays: dict[str, np.ndarray], remedy: str = "recompute the file from its images") -> None:
    """One sentence naming `source`, the array and the count of NaN or inf values in it: the
    metrics of such inputs are undefined (and scipy's sqrtm can spin for many minutes on them)."""
    for key, array in arrays.items():
        bad = ~np.isfinite(array)
        if bad.any():
            rows = int(bad.reshape(len(array), -1).any(axis=1).sum()) if array.ndim > 1 else None
            where = f" in {rows:,} of its {len(array):,} rows" if rows is not None else ""
            raise ValueError(
                f"{source}: {key} holds {int(bad.sum()):,} non-finite value(s) (NaN or inf){where}; "
                f"the metrics of such values are undefined, so {remedy}"
            )


def load_activations(path: str) -> Activations:
    """An activation file, checked: pool, spatial and softmax float32 with as many rows each."""
    with open_npz(path) as npz:
        missing = [key for key in ACTIVATION_DIMS if key not in npz.files]
        if missing:
            raise ValueError(f"{path} is not an activation file: it lacks {', '.join(missing)}")
        arrays = {key: npz[key] for key in ACTIVATION_DIMS}
        stats = read_stats(path, npz)
    num = len(arrays["pool"])
    for key, dim in ACTIVATION_DIMS.items():
        array = arrays[key]
        if array.dtype != np.float32 or array.shape != (num, dim) or num == 0:
            raise ValueError(
                f"{path}: {key} must be float32 of shape (N, {dim}) with the same N >= 1 as pool, "
                f"got {array.dtype} {array.shape}"
            )
    check_finite(path, arrays)
    return Activations(**arrays, stats=stats)


def is_image_batch(path: str) -> bool:
    """arr_0 present: images; else an activation file (checked when it is loaded)."""
    with open_npz(path) as npz:
        return "arr_0" in npz.files


def read_npy_header(f, path: str, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the .npy member `key` open as f, leaving f at its data."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{path}: {key} is stored in .npy format {version}, which is not read here; re-save it with np.savez")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


def stored_rows(path: str, key: str) -> int | None:
    """The first dimension of the array `key` of an .npz, from its header alone; None without one."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            shape, _, _ = read_npy_header(f, path, key)
    except KeyError:  # no such array: the full check of the file says what it lacks
        return None
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is damaged ({error})") from None
    return shape[0] if shape else None


@contextmanager
def open_images(path: str) -> Iterator[tuple[tuple[int, ...], object]]:
    """arr_0's shape and a file object at the start of its data, read from the archive without
    loading it (a 50K batch at 256 px is ~10 GB)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
            shape, fortran_order, dtype = read_npy_header(f, path, "arr_0")
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0 or fortran_order:
                raise ValueError(
                    f"{path}: arr_0 must be a C-ordered uint8 array of shape (N, H, W, 3) with N >= 1, "
                    f"got {dtype} {shape}{' in Fortran order' if fortran_order else ''}"
                )
            yield shape, f
    except zipfile.BadZipFile as error:  # a CRC mismatch, here or while the caller reads: damaged on disk or in transfer
        raise ValueError(f"{path} is damaged ({error})") from None


def image_batches(path: str, batch_size: int) -> Iterator[np.ndarray]:
    with open_images(path) as (shape, f):
        image_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * image_bytes)
            if len(data) != count * image_bytes:
                raise ValueError(f"{path} is truncated: arr_0 ends before image {start + len(data) // image_bytes}")
            yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *shape[1:])  # writable, for torch


def num_images(path: str) -> int:
    with open_images(path) as (shape, _):
        return shape[0]


# ---------------------------------------------------------------- the network


def resolve_inception_weights(path: str | None) -> str:
    """A local copy of torch-fidelity's Inception weights: `path`, or the file downloaded once
    into torch's hub cache (where torch-fidelity itself keeps it)."""
    if path is None:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, path, progress=True)
            except (urllib.error.URLError, OSError) as error:
                raise ValueError(
                    f"could not download the Inception weights {WEIGHTS_FILE} from {WEIGHTS_URL} ({error}); "
                    f"download that file elsewhere and pass --inception-weights PATH"
                ) from None
    if not os.path.isfile(path):
        raise ValueError(f"--inception-weights {path} does not exist; it should be {WEIGHTS_FILE} from {WEIGHTS_URL}")
    try:  # checked with weights_only=True before torch-fidelity loads it again
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever makes it unreadable or unsafe, the same sentence
        raise ValueError(f"{path} is not a loadable weights file ({type(error).__name__}); it should be {WEIGHTS_FILE}") from None
    return path


def build_inception(weights_path: str, device: torch.device) -> torch.nn.Module:
    """torch-fidelity's port of the TF Inception graph; it returns pool_3 and the bias-free logits
    (ADM's softmax multiplies pool_3 by the `softmax/logits/MatMul` weights alone)."""
    try:
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
    except RuntimeError as error:  # load_state_dict: another network's weights
        raise ValueError(f"{weights_path} does not hold the Inception-v3 weights {WEIGHTS_FILE}: {str(error).splitlines()[0]}") from None
    return model.to(device)


def flatten_spatial(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """(N, C, 17, 17) -> (N, 2023): the first 7 channels in (H, W, C) order, as ADM flattens TF's NHWC map."""
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(mixed_6_conv), -1)


@torch.no_grad()
def inception_activations(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """pool, spatial and softmax of uint8 (N, H, W, 3) images on the model's device.

    TF's graph names its Inception blocks mixed, mixed_1, ..., mixed_10; torch-fidelity's weight
    converter maps `mixed_6/conv/{conv2d_params,batchnorm}` to Mixed_6d.branch1x1. The TF tensor
    `mixed_6/conv:0`, the output of that scope, is the 1x1 branch after batch norm and ReLU: what
    BasicConv2d Mixed_6d.branch1x1 returns, so a forward hook there reads ADM's sFID layer."""
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: captured.update(mixed_6_conv=output))
    try:
        pool, logits = model(images.permute(0, 3, 1, 2))  # torch-fidelity wants uint8 NCHW at any size
    finally:
        hook.remove()
    return {"pool": pool, "spatial": flatten_spatial(captured["mixed_6_conv"]), "softmax": F.softmax(logits, dim=1)}


def compute_activations(path: str, model: torch.nn.Module, device: torch.device, batch_size: int) -> Activations:
    with open_npz(path) as npz:  # checked before the long part
        stats = read_stats(path, npz)
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in ACTIVATION_DIMS}
    batches = image_batches(path, batch_size)
    for batch in tqdm(batches, total=-(-num_images(path) // batch_size), desc=os.path.basename(path), unit="batch"):
        for key, value in inception_activations(model, torch.from_numpy(batch).to(device)).items():
            outputs[key].append(value.float().cpu().numpy())
    arrays = {key: np.concatenate(value) for key, value in outputs.items()}
    check_finite(f"the Inception activations of {path}", arrays, "check that its images and the Inception weights are intact")
    return Activations(**arrays, stats=stats)


def save_activations(acts: Activations, path: str) -> None:
    """Write an activation file atomically; stored FID statistics of the images travel with it."""
    arrays = {"pool": acts.pool, "spatial": acts.spatial, "softmax": acts.softmax, **(acts.stats or {})}
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def activation_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ACTIVATION_SUFFIX


# ---------------------------------------------------------------- the metrics


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64. From no more samples than dimensions the covariance is
    singular and the distance biased upward, but defined (ADM computes it too)."""
    return features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False)


def check_count(name: str, count: int) -> None:
    """Precision and recall need a k-th neighbour besides the image itself; the rest needs less."""
    if count <= NEIGHBOURHOOD:
        raise ValueError(f"{name} has {count} image{'' if count == 1 else 's'}; precision and recall need more than {NEIGHBOURHOOD}")


def small_set_warning(ref: Activations, sample: Activations) -> str | None:
    """One line when FID or sFID comes from a rank-deficient covariance (no stored statistics)."""
    sizes = [
        (len(acts.pool), name) for name, acts in (("reference", ref), ("sample", sample))
        if acts.stats is None and len(acts.pool) <= max(acts.pool.shape[1], acts.spatial.shape[1])
    ]
    if not sizes:
        return None
    count, name = min(sizes)
    return f"warning: FID (and sFID) from {count:,} {name} images is biased upward; ADM's numbers use 50,000"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 (Heusel et al. 2017), with ADM's
    fallbacks: eps on the diagonals when sqrtm of a near-singular product is not finite, and the
    real part when rounding leaves a small imaginary one."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(x, dtype=np.float64) for x in (mu1, mu2, sigma1, sigma2))
    check_finite("the Frechet distance", {"mu1": mu1, "sigma1": sigma1, "mu2": mu2, "sigma2": sigma2}, "pass finite statistics")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"the product of the covariances is singular; adding {eps} to their diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.abs(covmean.imag).max()
            raise ValueError(f"the matrix square root has an imaginary part up to {largest:.3g}, so the Frechet distance is undefined")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(softmax: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split of split_size images, averaged over the splits
    (Salimans et al. 2016), with p(y) the split's mean prediction."""
    scores = []
    for start in range(0, len(softmax), split_size):
        p_yx = softmax[start : start + split_size].astype(np.float64)
        p_y = p_yx.mean(axis=0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(p_yx * (np.log(p_yx) - np.log(p_y)), axis=1))))
    return float(np.mean(scores))


def _distance_formula(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) with every op's result rounded to u's dtype, as TF rounds each
    op of ADM's graph. The sums run in float32 over exact float16 products and are rounded once, as
    TF's half matmul does; TF sums the squared norms in float16 in a kernel- and hardware-dependent
    order, which no other code can repeat bit for bit (1 to 2 float16 steps apart on the data checked)."""
    norm_u = (u * u).float().sum(dim=1).to(u.dtype)
    norm_v = (v * v).float().sum(dim=1).to(v.dtype)
    dots = (u.float() @ v.float().T).to(u.dtype)
    return torch.clamp_min((norm_u[:, None] - 2 * dots) + norm_v[None, :], 0)


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's pairwise squared distances of one block: float16, or float32 where that overflows."""
    distances = _distance_formula(u.half(), v.half())
    if torch.isfinite(distances).all():
        return distances.float()
    return _distance_formula(u.float(), v.float())


def manifold_radii(features: torch.Tensor, k: int = NEIGHBOURHOOD, block: int = DISTANCE_BLOCK) -> torch.Tensor:
    """Each feature's squared distance to its k-th nearest neighbour (itself, at distance ~0, being the 0th)."""
    radii = torch.empty(len(features), device=features.device)
    for row in range(0, len(features), block):
        rows, nearest = features[row : row + block], []
        for col in range(0, len(features), block):
            # The k+1 smallest of every column block hold the k+1 smallest of the whole row.
            distances = squared_distances(rows, features[col : col + block])
            nearest.append(distances.topk(min(k + 1, distances.shape[1]), dim=1, largest=False).values)
        radii[row : row + block] = torch.cat(nearest, dim=1).kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(ref: torch.Tensor, sample: torch.Tensor, block: int = DISTANCE_BLOCK) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of samples inside some
    reference k-NN ball, and of references inside some sample k-NN ball."""
    ref_radii, sample_radii = manifold_radii(ref, block=block), manifold_radii(sample, block=block)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_covered = torch.zeros(len(sample), dtype=torch.bool, device=sample.device)
    for row in range(0, len(ref), block):
        for col in range(0, len(sample), block):
            distances = squared_distances(ref[row : row + block], sample[col : col + block])
            ref_covered[row : row + block] |= (distances <= sample_radii[None, col : col + block]).any(dim=1)
            sample_covered[col : col + block] |= (distances <= ref_radii[row : row + block, None]).any(dim=0)
    return sample_covered.double().mean().item(), ref_covered.double().mean().item()


def evaluate(ref: Activations, sample: Activations, device: torch.device) -> dict[str, float]:
    """The five numbers of SAMPLE against REF; stored mu/sigma take precedence, as in ADM."""
    for name, acts in (("the reference", ref), ("the sample", sample)):
        check_count(name, len(acts.pool))
    stats = {}
    for name, acts in (("reference", ref), ("sample", sample)):
        if acts.stats is not None:
            stats[name] = (acts.stats["mu"], acts.stats["sigma"]), (acts.stats["mu_s"], acts.stats["sigma_s"])
        else:
            stats[name] = fid_statistics(acts.pool), fid_statistics(acts.spatial)
    precision, recall = precision_recall(torch.from_numpy(ref.pool).to(device), torch.from_numpy(sample.pool).to(device))
    return {
        "inception_score": inception_score(sample.softmax),
        "fid": frechet_distance(*stats["sample"][0], *stats["reference"][0]),
        "sfid": frechet_distance(*stats["sample"][1], *stats["reference"][1]),
        "precision": precision,
        "recall": recall,
    }


# ---------------------------------------------------------------- the script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser("Inception Score, FID, sFID, precision and recall of SAMPLE against REF, as ADM's evaluator has them.")
    parser.add_argument("ref", type=str, help="reference: image batch .npz (arr_0) or activation file, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("sample", type=str, help="samples: image batch .npz (arr_0) or activation file, e.g. sample_ddp.py's .npz")
    parser.add_argument("--json", type=str, default=None, help="also write the five numbers to this JSON file")
    parser.add_argument(
        "--inception-weights", type=str, default=None,
        help=f"local copy of {WEIGHTS_FILE}; without it, the file is downloaded once into torch's hub cache",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per Inception forward (ADM: 64); changes no number beyond float rounding"
    )
    parser.add_argument(
        "--save-activations", action="store_true",
        help=f"write each image batch's activations beside it as <name>{ACTIVATION_SUFFIX}, to pass instead of it next time",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def check_input_sizes(paths: tuple[str, str]) -> None:
    """Both inputs' image counts, from the .npz headers, before the network runs on either."""
    for name, path in zip(("the reference", "the sample"), paths):
        count = stored_rows(path, "arr_0" if is_image_batch(path) else "pool")
        if count is not None:
            check_count(f"{name} {path}", count)


def open_inputs(paths: tuple[str, str]) -> list[Activations | None]:
    """Check both inputs before any Inception pass (hours for 50K images): activation files are
    loaded and checked whole; image batches get their header and stored statistics checked.
    Returns the activations of each activation file, None for each image batch."""
    check_input_sizes(paths)
    opened: list[Activations | None] = []
    for path in paths:
        if is_image_batch(path):
            num_images(path)  # dtype and shape of arr_0
            with open_npz(path) as npz:
                read_stats(path, npz)
            opened.append(None)
        else:
            opened.append(load_activations(path))
    return opened


def read_inputs(args: argparse.Namespace, device: torch.device) -> tuple[Activations, Activations]:
    """Both inputs as activations; the network is built only when one of them is images."""
    model = None
    inputs = []
    for path, loaded in zip((args.ref, args.sample), open_inputs((args.ref, args.sample))):
        if loaded is not None:
            inputs.append(loaded)
            continue
        if model is None:
            model = build_inception(resolve_inception_weights(args.inception_weights), device)
        acts = compute_activations(path, model, device, args.batch_size)
        if args.save_activations:
            save_activations(acts, activation_path(path))
            print(f"saved {activation_path(path)}")
        inputs.append(acts)
    return inputs[0], inputs[1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = default_device()
    configure_precision("fp32")  # no TF32: the features and distances are ADM's float32 ones
    try:
        ref, sample = read_inputs(args, device)
        warning = small_set_warning(ref, sample)
        if warning:
            print(warning, file=sys.stderr)
        with warnings.catch_warnings():
            if warning:  # what scipy would add about the singular covariance, the line above says
                warnings.simplefilter("ignore", linalg.LinAlgWarning)
            scores = evaluate(ref, sample, device)
    except ValueError as error:
        sys.exit(f"evaluate.py: error: {error}")
    print(f"Inception Score: {scores['inception_score']}\nFID: {scores['fid']}\nsFID: {scores['sfid']}")
    print(f"Precision: {scores['precision']}\nRecall: {scores['recall']}")
    if args.json is not None:
        with atomic_open(args.json) as f:
            json.dump(scores, f, indent=2)


if __name__ == "__main__":
    main()
