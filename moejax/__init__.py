"""moejax: principled Mixture-of-Experts language-model design in JAX/Flax.

Dimension letters used in names at module boundaries (`x_BLD`, `logits_TE`, `w_EDF`):
  B batch, L length, T tokens (B*L), D model width, F FFN hidden, E experts,
  K top-k (experts per token), C capacity, H heads, V vocabulary, N blocks, R padded rows.
"""

import logging as _logging
import sys as _sys


def setup_logging() -> None:
  """moejax's own INFO lines to stderr; library (absl/orbax) chatter only from WARNING up."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = _logging.getLogger('moejax')
  if not logger.handlers:
    handler = _logging.StreamHandler(_sys.stderr)
    handler.setFormatter(_logging.Formatter('%(asctime)s moejax %(message)s', '%H:%M:%S'))
    logger.addHandler(handler)
  logger.setLevel(_logging.INFO)
  logger.propagate = False
