"""Compatibility: the defaults moved into the package as `moejax.base_config`.

Experiment files written for older checkouts (`from experiments import base`) keep working;
new ones import `from moejax import base_config as base`.
"""

from moejax.base_config import get_config  # noqa: F401
