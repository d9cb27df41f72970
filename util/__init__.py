"""What the scripts share, one concern a module:

  files             atomic writes, one-sentence disk errors, run folders, metrics.jsonl
  checkpoints       checkpoint files: atomic save, safe load, stale temporaries; CheckpointError, WeightsError
  pretrained        load_weights: every source (released name, file, state dict, diffusers folder, hf:) -> DiT weights
  diffusers_format  DiT weights between the official and diffusers' key layouts
  data              image folders, feature stores, the epoch-exact sampler
  vae               the autoencoder DiT works in (an AutoencoderKL, or pixels): load, encode, decode
  images            centre crop, uint8 conversion, sample grids
  sampling          weights -> model, samplers, classifier-free guidance, denoising loops
  precision         fp32 / tf32 / bf16 / fp16 choice and autocast
  distributed       process group set-up, collectives, the logger
  stop_signals      SIGTERM / SIGUSR1 / SIGINT / SIGHUP turned into a stop at a step boundary
  run_lock          one job per run folder: a lock file with its holder, a heartbeat, stale-lock take-over
  flags             command-line flags several scripts share; the sampling scripts' model from --ckpt
  training          optimizer, EMA (and its warm-up), latents, one accumulated training step, statistics
  run_state         a training run's fixed parts (Run) and where it stands (TrainState)
  resume            the resume policy: which checkpoint, matching settings, exact restore of a run
  batches           this process's loader and its micro-batches as latents
  run_outputs       metrics records and checkpoints; a diverged loss or failed write stops every rank
  sample_grids      the EMA sample grids saved during training
  finetune          weights to fine-tune from, fitted to the model (label table, pos_embed)
"""
