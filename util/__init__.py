"""What the scripts share, one concern a module:

  files             atomic writes, one-sentence disk errors, run folders, metrics.jsonl
  checkpoints       checkpoint files: atomic save, safe load, the newest one that loads
  pretrained        released checkpoints, hub names, diffusers folders -> DiT weights
  diffusers_format  DiT weights between the official and diffusers' key layouts
  data              image folders, feature stores, the epoch-exact sampler
  vae               the autoencoder DiT works in (an AutoencoderKL, or pixels): load, encode, decode
  images            centre crop, uint8 conversion, sample grids
  sampling          weights -> model, classifier-free guidance, denoising loops
  precision         fp32 / tf32 / bf16 / fp16 choice and autocast
  distributed       process group set-up, collectives, the logger
  stop_signals      SIGTERM / SIGUSR1 turned into a stop at a step boundary
  flags             command-line flags several scripts share
"""
