"""The `config.data` section: one place that names every knob the input pipeline reads."""
from __future__ import annotations

import ml_collections

DATASET_KINDS = ("digits", "tfds", "latents")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for the bundled 5,000 MNIST digits, so a fresh checkout trains with no download.

    Fields:
      name: 'digits' (bundled, prepared on first use), 'tfds' (any TFDS image dataset already
        prepared as array_record) or 'latents' (a directory written by `ditjax.data.latents`).
      tfds_name: TFDS dataset name for name='tfds', e.g. 'imagenet2012' or 'cifar10'.
      data_dir: TFDS data dir; '' means $TFDS_DATA_DIR, else ~/tensorflow_datasets.
      split: TFDS split (slices such as 'train[:90%]' work); digits also has 'classifier_train'
        and 'classifier_test'. Unused for latents.
      image_size: output side in pixels for digits/tfds (ADM centre crop when it differs from the
        stored size). Unused for latents, whose shape comes from the latent file.
      random_flip: per-example horizontal flip with p=0.5. Off for digits (a mirrored digit is not
        a digit); ADM/DiT use it for ImageNet. For latents it flips the latent's width axis.
      latent_path: directory written by `ditjax.data.latents.write_latents` (name='latents').
      latent_scale: multiplier applied to latents when reading (SD-VAE 0.18215, as DiT/REPA).
      cache_decoded: digits/tfds: decode the whole split once into host memory and serve it from
        there (small datasets only: validation refuses one that would take over half the free RAM).
      num_threads: grain reader threads; each prepares whole local batches.
      prefetch_batches: local batches buffered ahead of the trainer.
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "digits"
    cfg.tfds_name = ""
    cfg.data_dir = ""
    cfg.split = "train"
    cfg.image_size = 32
    cfg.random_flip = False
    cfg.latent_path = ""
    cfg.latent_scale = 0.18215
    cfg.cache_decoded = False
    cfg.num_threads = 2
    cfg.prefetch_batches = 2
    return cfg
