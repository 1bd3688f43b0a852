"""Sweep helpers for experiment files: build lists of dotted-override dicts."""

from __future__ import annotations

import builtins
import itertools
from typing import Any, Iterable

from moejax.errors import ConfigError


def product(*axes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """Cartesian product of override lists: product([{'a': 1}, {'a': 2}], [{'b': 3}]) -> 2 points."""
  points = []
  for combo in itertools.product(*[list(a) for a in axes]):
    point: dict[str, Any] = {}
    for part in combo:
      point.update(part)
    points.append(point)
  return points


def zip(*axes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:  # pylint: disable=redefined-builtin
  """Element-wise merge of equally long override lists."""
  lists = [list(a) for a in axes]
  if len({len(a) for a in lists}) > 1:
    raise ConfigError(f'sweep zip over lists of different lengths: {[len(a) for a in lists]}')
  return [{k: v for part in parts for k, v in part.items()} for parts in builtins.zip(*lists)]


def sweep(key: str, values: Iterable[Any]) -> list[dict[str, Any]]:
  """One axis: sweep('moe.num_experts', [8, 32]) -> [{'moe.num_experts': 8}, {'moe.num_experts': 32}]."""
  return [{key: v} for v in values]
