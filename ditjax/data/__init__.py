"""Input pipelines: bundled digits, any array_record TFDS image dataset, precomputed VAE latents.

Trainer API: `ditjax.data.pipeline.make_train_iterator` and `dataset_info`; config section:
`default_data_config()`. Only the config is imported here, so config files stay cheap to load
(the pipeline pulls in TFDS and grain).
"""
from ditjax.data.config import default_data_config

__all__ = ["default_data_config"]
