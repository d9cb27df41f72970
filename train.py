"""Train a DiT on latents of an image folder (or of pre-extracted features).

  torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /data/imagenet/train
  python train.py --model DiT-S/8 --data-path DIR          (one process, on a GPU or the CPU)

Each run writes results/NNN-<model>/ with log.txt, metrics.jsonl, checkpoints/ and
(with --sample-every) samples/. `--resume auto` continues the newest run of the model, on
any number of processes and any --grad-accum-steps that keep the global batch;
`--init-from CKPT` fine-tunes from other weights. One job at a time trains in a run folder (a
lock, util/run_lock.py). SIGTERM, SIGUSR1 (preemption, a time limit), SIGINT (Ctrl-C) or
SIGHUP saves a checkpoint after the current step and exits. This file reads top-down: flags,
set-up, the loop; the building blocks live in util/ (training, resume, run_state, batches,
run_outputs, sample_grids, finetune).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import signal
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch.utils.data import Dataset

from diffusion import NUM_TRAIN_STEPS, create_diffusion
from util.batches import make_loader, next_micro_batches
from util.data import FeatureDataset, ImageDataset, vae_encoder_fingerprint
from util.checkpoints import CheckpointError, WeightsError
from util.distributed import (
    DistInfo, all_gather_objects, cleanup_distributed, create_logger, max_over_ranks, setup_distributed,
)
from util.files import WriteError, create_run_dir, first_line, output_folder_problem
from util.finetune import describe_weights, fit_weights, initial_weights
from util.flags import (
    add_compile_flag, add_data_flags, add_model_flags, add_precision_flag, add_vae_flags, make_parser, vae_error_sentence,
)
from util.precision import setup_precision
from util.pretrained import PRETRAINED_MODELS
from util.resume import (
    ResumeError, data_differences, experiment_name, open_resume_checkpoint, remove_abandoned_temporaries, restore_rng_state,
    restore_run, tidy_resumed_folder,
)
from util.run_lock import RunLock, RunLockedError
from util.run_outputs import log_metrics, save_training_checkpoint
from util.run_state import Run, TrainState, build_run, micro_batch_size
from util.sample_grids import save_samples
from util.stop_signals import StopRequest, exit_code
from util.training import RunningStats, accumulated_step, ema_decay_at, ema_initial_share, update_ema, wrap_for_training
from util.vae import HUB_VAES, SD_VAE_DESCRIPTION, Autoencoder, AutoencoderError, load_autoencoder

logger = logging.getLogger("dit")


# ---------------------------------------------------------------------------------------- flags

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser("Train a class-conditional DiT.")
    add_data_flags(parser, required=False)
    parser.add_argument("--feature-path", type=str, default=None, help="train from extract_features.py output instead of images")
    parser.add_argument("--results-dir", type=str, default="results", help="each run gets a new folder NNN-<model> here")
    add_model_flags(parser)
    parser.add_argument(
        "--class-dropout-prob", type=float, default=0.1,
        help="labels replaced by the null label in training, for classifier-free guidance (paper Section 3.1); "
        "0 gives no null label (with --num-classes 1: unconditional training)",
    )
    parser.add_argument("--epochs", type=int, default=1400, help="passes over the data (the run also stops at --max-steps)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    parser.add_argument("--global-batch-size", type=int, default=256, help="images per optimizer step over all processes (paper: 256)")
    parser.add_argument(
        "--grad-accum-steps", type=int, default=1,
        help="split each process's share of a global batch into this many micro-batches (one backward pass each)",
    )
    parser.add_argument("--global-seed", type=int, default=0, help="seeds the data order and every random draw")
    add_vae_flags(parser, default="ema")
    parser.add_argument("--log-every", type=int, default=100, help="steps between log lines and metrics.jsonl records")
    parser.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints (a stop signal also writes one)")
    parser.add_argument(
        "--keep-last", type=int, default=None,
        help="keep only the newest N checkpoints of the run, deleting older ones once a new one is written (unset: keep all)",
    )
    parser.add_argument("--sample-every", type=int, default=0, help="save an EMA sample grid every N steps (0: never)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDPM steps for the sample grids")
    parser.add_argument(
        "--tensorboard", action="store_true",
        help="also write the metrics and sample grids as TensorBoard events to <experiment>/tensorboard (needs tensorboard)",
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant, no weight decay (paper Section 4)")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="decay of the EMA weights that sampling uses")
    parser.add_argument(
        "--ema-warmup", action="store_true",
        help="EMA decay min(--ema-decay, (1 + t) / (10 + t)) at update t, so that short runs get a useful EMA "
        "(off: the paper's constant decay)",
    )
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips of the training images (paper: flips)")
    add_precision_flag(parser, default="tf32")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    add_compile_flag(parser)
    parser.add_argument(
        "--attention", type=str, choices=("fused", "plain"), default="fused",
        help="fused: scaled_dot_product_attention; plain: the written-out formula (faster for bf16 training on CPUs)",
    )
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint to continue, or 'auto' for the newest one that loads")
    parser.add_argument(
        "--accept-changed-data", action="store_true",
        help="resume even though the data differs from the checkpoint's (other files, another number of images); "
        "the log records what changed (off: such a resume is refused)",
    )
    parser.add_argument(
        "--init-from", type=str, default=None,
        help="fine-tune: start from the model and EMA weights of a checkpoint path or a released name "
        f"({', '.join(PRETRAINED_MODELS)}), with a new optimizer at step 0; ignored when resuming",
    )
    return parser.parse_args(argv)


def validate_values(args: argparse.Namespace) -> None:
    """Exit with one sentence on a flag value out of its range, before any folder or work."""
    if args.data_path is not None and args.feature_path is not None:
        raise SystemExit("pass either --data-path (images) or --feature-path (features made by extract_features.py), not both")
    for flag in ("global_batch_size", "grad_accum_steps", "epochs", "num_classes", "log_every", "ckpt_every"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.keep_last is not None and args.keep_last < 1:
        raise SystemExit(f"--keep-last must be at least 1 (the newest checkpoint is always kept), not {args.keep_last}")
    for flag in ("max_steps", "num_workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be 0 or more, not {getattr(args, flag)}")
    if args.sample_every < 0:
        raise SystemExit(f"--sample-every must be 0 (never) or more, not {args.sample_every}")
    if not 1 <= args.sample_steps <= NUM_TRAIN_STEPS:
        raise SystemExit(f"--sample-steps must be between 1 and {NUM_TRAIN_STEPS} (the diffusion's steps), not {args.sample_steps}")
    if not (math.isfinite(args.lr) and args.lr >= 0):
        raise SystemExit(f"--lr must be a finite number of 0 or more, not {args.lr}")
    if not 0 <= args.ema_decay <= 1:  # also refuses nan
        raise SystemExit(f"--ema-decay must be between 0 and 1, not {args.ema_decay}")
    problem = output_folder_problem(args.results_dir, "--results-dir")
    if problem:
        raise SystemExit(problem)
    if args.feature_path is not None and os.path.exists(args.feature_path) and not os.path.isdir(args.feature_path):
        raise SystemExit(f"--feature-path {args.feature_path} is a file, not a folder")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Exit with one sentence on settings that cannot work, before any work starts."""
    validate_values(args)
    if args.data_path is None and args.feature_path is None:
        raise SystemExit("pass --data-path (an image folder) or --feature-path (the output of extract_features.py)")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard")
    if not 0 <= args.class_dropout_prob < 1:
        raise SystemExit(f"--class-dropout-prob must lie in [0, 1), got {args.class_dropout_prob}")
    if args.global_batch_size % (world_size * args.grad_accum_steps):
        raise SystemExit(
            f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world_size}"
            + (f" times --grad-accum-steps {args.grad_accum_steps}" if args.grad_accum_steps > 1 else "")
        )
    if args.no_flip and args.feature_path is not None:
        raise SystemExit("--no-flip applies to --data-path images; a --feature-path store serves each image and its mirror image")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume} does not exist")
    if args.init_from is not None and args.init_from not in PRETRAINED_MODELS and not os.path.isfile(args.init_from):
        raise SystemExit(
            f"--init-from {args.init_from} does not exist; pass a checkpoint file or a released name ({', '.join(PRETRAINED_MODELS)})"
        )


# ---------------------------------------------------------------------------------------- set-up


def open_dataset(args: argparse.Namespace) -> FeatureDataset | ImageDataset:
    """The training set (features when --feature-path is given), checked against the settings."""
    try:
        if args.feature_path:
            dataset = FeatureDataset(args.feature_path)
        else:
            dataset = ImageDataset(args.data_path, args.image_size, flip=not args.no_flip)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.feature_path and dataset.meta["image_size"] != args.image_size:
        raise SystemExit(
            f"the features in {args.feature_path} were extracted at --image-size {dataset.meta['image_size']}, not {args.image_size}"
        )
    num_classes = len(dataset.meta["classes"]) if args.feature_path else len(dataset.classes)
    if num_classes > args.num_classes:
        raise SystemExit(f"the data has {num_classes} classes but --num-classes is {args.num_classes}")
    if len(dataset) < args.global_batch_size:
        raise SystemExit(f"the dataset has {len(dataset)} images, fewer than --global-batch-size {args.global_batch_size}")
    return dataset


def resume_refusal(error: ValueError) -> str:
    """The sentence of a refused resume, with the flag that accepts changed data when only the data differs."""
    if isinstance(error, ResumeError) and error.data_only:
        return f"{error}, or pass --accept-changed-data to continue on the data as it is now"
    return str(error)


def continue_on_changed_data(
    args: argparse.Namespace, checkpoint: dict, dataset_size: int, fingerprint: str | None, state: TrainState
) -> TrainState:
    """With --accept-changed-data, log how the data differs from the checkpoint's. A dataset of
    another size has another data order, so the resumed run starts the next epoch."""
    if not args.accept_changed_data:
        return state
    changes = data_differences(checkpoint, args, dataset_size, fingerprint)
    if not changes:
        logger.info("--accept-changed-data: the data is the checkpoint's, nothing changed")
        return state
    logger.info(f"--accept-changed-data: continuing on other data than the checkpoint was trained with: {', '.join(changes)}")
    if checkpoint["dataset_size"] != dataset_size and state.epoch_step:
        logger.info(
            f"epoch {state.epoch} ends at step {state.step} (its order was drawn for {checkpoint['dataset_size']} images): "
            f"step {state.step + 1} starts epoch {state.epoch + 1}"
        )
        state = replace(state, epoch=state.epoch + 1, epoch_step=0)
    return state


def check_feature_vae(args: argparse.Namespace, dataset: FeatureDataset, autoencoder: Autoencoder) -> None:
    if autoencoder.module is None or vae_encoder_fingerprint(autoencoder.module) != dataset.meta["vae_encoder"]:
        used = args.vae_path or HUB_VAES.get(args.vae, args.vae)
        raise SystemExit(
            f"the features in {args.feature_path} were extracted with another VAE ({dataset.meta['vae']}) than {used}"
        )


def open_autoencoder(
    args: argparse.Namespace, dataset: FeatureDataset | ImageDataset, device: torch.device, notes: list[str]
) -> Autoencoder:
    """The space the DiT is trained in: pixels (--vae none) or an autoencoder's latents.

    Images are encoded by the loaded autoencoder. Features become latents with the scale and
    shift in the store's meta.json; their autoencoder's weights are loaded only to decode sample
    grids, or when --vae-path names a local VAE other than the features' own (no network), to
    check that it matches.
    """
    if args.feature_path is None:
        return load_checked_autoencoder(args, device)
    store = Autoencoder.from_description(dataset.meta.get("autoencoder", SD_VAE_DESCRIPTION))
    if args.sample_every == 0 and args.vae_path in (None, dataset.meta["vae"]):
        notes.append(f"no VAE loaded: training from features made with {dataset.meta['vae']}, and no sample grids asked")
        return store
    loaded = load_checked_autoencoder(args, device if args.sample_every > 0 else torch.device("cpu"))
    check_feature_vae(args, dataset, loaded)
    return replace(store, module=loaded.module if args.sample_every > 0 else None)


def load_checked_autoencoder(args: argparse.Namespace, device: torch.device) -> Autoencoder:
    """load_autoencoder, exiting with its sentence with the flag that fixes it."""
    try:
        return load_autoencoder(args.vae, device, args.vae_path)
    except AutoencoderError as error:
        raise SystemExit(vae_error_sentence(error, args.vae_path)) from None


def check_patch_grid(args: argparse.Namespace, autoencoder: Autoencoder) -> int:
    """The latent side for --image-size, exiting unless the model's patches tile it."""
    try:
        latent = autoencoder.latent_size(args.image_size)
    except AutoencoderError as error:
        raise SystemExit(f"--image-size {error}") from None
    patch_size = int(args.model.split("/")[-1])
    if latent % patch_size:
        grid = "pixels" if autoencoder.is_pixels else "latents"
        raise SystemExit(
            f"--image-size {args.image_size} gives {latent}x{latent} {grid}, which {args.model} cannot cut into "
            f"{patch_size}x{patch_size} patches; use a multiple of {autoencoder.downsample * patch_size}"
        )
    return latent


def experiment_folder(args: argparse.Namespace, resume_path: str | None) -> str:
    """The experiment folder: the resumed run's own, or a new one."""
    if resume_path is not None and os.path.basename(os.path.dirname(resume_path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
    return create_run_dir(args.results_dir, experiment_name(args.model))


def claim_experiment_folder(
    args: argparse.Namespace, resume_path: str | None, info: DistInfo, on_exit: ExitStack
) -> str | None:
    """Rank 0's experiment folder (None on other ranks), locked until this job exits. When it
    cannot be made or another live job holds it, every rank exits with rank 0's sentence."""
    folder, problem = None, None
    if info.is_main:
        try:
            folder = experiment_folder(args, resume_path)
            on_exit.enter_context(RunLock(folder))
        except (RunLockedError, WriteError) as error:
            problem = str(error)
    problem = all_gather_objects(problem)[0]  # also the point where the other ranks wait for rank 0
    if problem is not None:
        raise SystemExit(problem)
    return folder


def fitted_initial_weights(run: Run, source: str, autoencoder: Autoencoder) -> tuple[dict, dict, list[str]]:
    """The model and EMA weights of --init-from fitted to the model (exits on a mismatch, naming
    what they were made for), and a note for each part that keeps the model's fresh values."""
    try:
        model_state, ema_state, settings = initial_weights(source)
    except WeightsError as error:
        raise SystemExit(error.with_flag("--init-from PATH")) from None
    try:
        model_state, ema_state, old_rows, old_grid = fit_weights(run.model, run.ema, model_state, ema_state, f"--init-from {source}")
    except ValueError as error:
        raise SystemExit(f"{error} (the weights are those of {describe_weights(model_state, settings)})") from None
    notes = []
    if old_rows is not None:
        null = " + the null label" if run.model.y_embedder.dropout_prob > 0 else ""
        notes.append(
            f"the label table of {source} has {old_rows} rows, this run needs {run.model.y_embedder.embedding_table.num_embeddings} "
            f"(--num-classes {run.args.num_classes}{null}): it starts from a new random initialisation"
        )
    if old_grid is not None:
        old_latent, latent = old_grid * run.model.patch_size, run.model.input_size
        pixels = settings.get("image_size") or old_latent * autoencoder.downsample
        notes.append(
            f"--init-from {source} was trained at {pixels} px ({old_latent}x{old_latent} latents): "
            f"pos_embed recomputed for {latent}x{latent} latents"
        )
    return model_state, ema_state, notes


def init_from(run: Run, source: str, model_state: dict, ema_state: dict, notes: list[str]) -> None:
    """Start from the weights to fine-tune (a new optimizer, at step 0)."""
    run.model.load_state_dict(model_state, strict=True)
    run.ema.load_state_dict(ema_state, strict=True)
    logger.info(f"initialised the model and EMA weights from {source} (new optimizer, step 0)")
    for note in notes:
        logger.info(note)


def log_set_up(args: argparse.Namespace, run: Run, notes: list[str], resume_path: str | None, fine_tune: bool) -> None:
    """The first lines of log.txt: the folder, the processes, the settings and what set-up noted."""
    info = run.info
    logger.info(f"experiment folder {run.experiment_dir}; {info.world_size} process(es) on {info.device}; arguments {vars(args)}")
    for note in notes:
        logger.info(note)
    if args.resume == "auto" and resume_path is None:
        logger.info(f"--resume auto found no checkpoint of {args.model} in {args.results_dir}: starting a new run")
    if args.init_from is not None and not fine_tune:
        logger.info(f"resuming: --init-from {args.init_from} is not used")


def set_up(args: argparse.Namespace, info: DistInfo, on_exit: ExitStack) -> tuple[Run, TrainState, Dataset, Autoencoder]:
    """Check the settings, open the data, the autoencoder and the checkpoint to resume or the
    weights to fine-tune, build what is trained, make and lock the experiment folder (released
    by `on_exit`), make the logger, then load the weights."""
    validate_args(args, info.world_size)
    args.precision, precision_note = setup_precision(args.precision, info.device)  # `auto` -> what it chose
    torch.manual_seed(args.global_seed * info.world_size + info.rank)
    dataset = open_dataset(args)
    vae_notes: list[str] = []  # said once the logger exists
    autoencoder = open_autoencoder(args, dataset, info.device, vae_notes)
    latent = check_patch_grid(args, autoencoder)
    notes = [precision_note] if precision_note else []
    # Rank 0 alone reads the data's fingerprint (a stat of every image file) and hands it to all.
    fingerprint = all_gather_objects(dataset.fingerprint() if info.is_main else None)[0]
    try:
        checkpoint, resume_path = open_resume_checkpoint(args, len(dataset), notes, info.is_main, fingerprint)
    except CheckpointError as error:
        raise SystemExit(error.with_flag("--resume PATH")) from None
    except ValueError as error:
        raise SystemExit(resume_refusal(error)) from None

    run = build_run(args, info, len(dataset), autoencoder.channels, latent)
    run.data_fingerprint = fingerprint
    fine_tune = args.init_from is not None and checkpoint is None
    initial = fitted_initial_weights(run, args.init_from, autoencoder) if fine_tune else None
    run.experiment_dir = claim_experiment_folder(args, resume_path, info, on_exit)
    create_logger(run.experiment_dir, info.rank)
    log_set_up(args, run, notes + vae_notes, resume_path, fine_tune)
    if info.is_main:
        remove_abandoned_temporaries(args.results_dir, experiment_name(args.model))
    if args.tensorboard and info.is_main:
        from torch.utils.tensorboard import SummaryWriter  # an optional dependency

        run.tensorboard = SummaryWriter(os.path.join(run.experiment_dir, "tensorboard"))

    state = TrainState()
    if initial is not None:
        init_from(run, args.init_from, *initial)
    if checkpoint is not None:
        state = restore_run(run, checkpoint, resume_path)
        state = continue_on_changed_data(args, checkpoint, len(dataset), fingerprint, state)
        if info.is_main:
            tidy_resumed_folder(run.experiment_dir, state.step, set_aside_newer=args.resume != "auto")
        restore_rng_state(checkpoint, state.step, info, args.global_seed)  # after everything that draws numbers
    return run, state, dataset, autoencoder


# ---------------------------------------------------------------------------------------- the loop


def say_if_the_ema_is_young(args: argparse.Namespace, step: int) -> None:
    """One line when the EMA weights are still mostly the initial ones (short runs at decay 0.9999)."""
    share = ema_initial_share(args.ema_decay, step, args.ema_warmup)
    if share > 0.5:
        decay = f"--ema-decay {args.ema_decay}" + (" with --ema-warmup" if args.ema_warmup else "")
        remedy = "a lower --ema-decay" if args.ema_warmup else "--ema-warmup or a lower --ema-decay"
        logger.info(
            f"the EMA weights still hold {share:.0%} of the initial weights after {step} steps ({decay}); "
            f"sample with --weights raw, or train with {remedy}"
        )


def stop_on_signal(run: Run, state: TrainState, stats: RunningStats, signal_number: int) -> None:
    """Save this step (unless just saved) and exit as the signal would have (128 + its number),
    saying how to continue. Every rank calls it at the same step (see max_over_ranks)."""
    if state.saved_step != state.step:
        save_training_checkpoint(run, state, stats)
    logger.info(
        f"stopped by {signal.Signals(signal_number).name} after step {state.step}: "
        f"saved checkpoint {state.last_checkpoint}; continue with --resume auto"
    )
    say_if_the_ema_is_young(run.args, state.step)
    raise SystemExit(exit_code(signal_number))


def out_of_memory_sentence(args: argparse.Namespace, info: DistInfo, error: BaseException) -> str:
    """What to change when a training step runs out of memory."""
    where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "host"
    return (
        f"out of {where} memory in a training step of {micro_batch_size(args, info.world_size)} images per micro-batch "
        f"({first_line(error)}); use smaller micro-batches with a higher --grad-accum-steps (now {args.grad_accum_steps}) "
        f"or recompute activations with --grad-checkpointing"
    )


def train(args: argparse.Namespace, info: DistInfo, stop: StopRequest, on_exit: ExitStack) -> None:
    run, state, dataset, autoencoder = set_up(args, info, on_exit)
    ema, device = run.ema.eval(), info.device
    train_model = wrap_for_training(run.model, args, device)
    diffusion = create_diffusion(timestep_respacing="")
    logger.info(f"{args.model}: {sum(p.numel() for p in run.model.parameters()):,} parameters")

    per_rank_batch = args.global_batch_size // info.world_size
    sampler, loader = make_loader(dataset, args, info)
    # Whole global batches only, the same number whatever the processes (see EpochSampler).
    steps_per_epoch = len(dataset) // args.global_batch_size
    using_features = args.feature_path is not None
    source = f"features in {args.feature_path}" if using_features else f"images in {args.data_path}"
    logger.info(
        f"{len(dataset):,} {source}; {steps_per_epoch} steps per epoch; global batch {args.global_batch_size} = "
        f"{micro_batch_size(args, info.world_size)} images x {args.grad_accum_steps} micro-batches x {info.world_size} process(es)"
    )

    max_steps = args.max_steps if args.max_steps is not None else float("inf")
    logger.info(f"training for {args.epochs} epochs" + (f" or {args.max_steps} steps" if args.max_steps else ""))
    stats = RunningStats(device)
    while state.epoch < args.epochs and state.step < max_steps:
        sampler.set_epoch(state.epoch, state.epoch_step * per_rank_batch)
        batches = iter(loader)
        for _ in range(steps_per_epoch - state.epoch_step):
            # One optimizer step on the global batch; then EMA, logs and checkpoints.
            micro_batches = next_micro_batches(batches, args.grad_accum_steps, autoencoder, using_features, device, stats)
            with_grad_norm = (state.step + 1) % args.log_every == 0
            try:
                loss, grad_norm, skipped_step = accumulated_step(
                    train_model, diffusion, run.optimizer, micro_batches, args.grad_accum_steps,
                    args.precision, with_grad_norm, run.scaler,
                )
            except (torch.OutOfMemoryError, MemoryError) as error:
                raise SystemExit(out_of_memory_sentence(args, info, error)) from None
            update_ema(ema, run.model, ema_decay_at(args.ema_decay, state.step, args.ema_warmup))
            stats.add(loss, skipped_step, grad_norm)
            state.advance(steps_per_epoch)

            if state.step % args.log_every == 0:
                log_metrics(run, state, stats)
            if state.step % args.ckpt_every == 0:
                save_training_checkpoint(run, state, stats)
            if signal_number := max_over_ranks(stop.signal_number):  # a stop signal on any rank
                stop_on_signal(run, state, stats, signal_number)
            if args.sample_every and state.step % args.sample_every == 0:
                save_samples(run, autoencoder, state.step)
            if state.step >= max_steps:
                break

    # ... the end: a final checkpoint unless this step was just saved
    if state.saved_step != state.step:
        save_training_checkpoint(run, state, stats)
    if run.tensorboard is not None:
        run.tensorboard.close()
    say_if_the_ema_is_young(args, state.step)
    logger.info(f"done after {state.step} steps")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    try:
        with StopRequest() as stop, ExitStack() as on_exit:  # on_exit: the run folder's lock
            train(args, info, stop, on_exit)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
