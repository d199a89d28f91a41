"""Console logging for the CLIs: ditjax's own progress lines, without orbax/absl/jax narration."""
from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    """One stdout handler; ditjax at INFO, the libraries (which narrate every save and read) at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.root.removeHandler(absl_logging.get_absl_handler())  # else every record prints twice
    if not logging.root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.root.addHandler(handler)
    logging.root.setLevel(logging.WARNING)
    logging.getLogger("ditjax").setLevel(logging.INFO)
