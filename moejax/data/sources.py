"""Document sources: (key, bytes) documents of a corpus, sorted by key, and the binary-file screen.

Sources (config `data.source`):
  'stdlib'      the running interpreter's standard library, every `*.py` file under the
                stdlib directory (site-packages excluded), sorted by relative path;
  'text:GLOB'   your own files (recursive `**` allowed), sorted by path;
  'tfds:NAME'   a TensorFlow-Datasets dataset read with `tfds.data_source` (no TensorFlow
                needed), one document per example, text from `data.tfds_text_key`.

Binary files: a document with a NUL byte, or with more than 5% control bytes (other than
whitespace, backspace and escape), looks binary; `data.binary_documents` says whether that is
an error (default), the document is skipped, or kept.
"""

from __future__ import annotations

import glob
import logging
import os
import sysconfig

import numpy as np

from moejax.errors import DataError

BINARY_SHARE = 0.05  # a document with more control bytes than this share looks binary (random bytes: ~10%)

log = logging.getLogger(__name__)


def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the interpreter's stdlib `*.py` files."""
  root = sysconfig.get_paths()['stdlib']
  rels = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages', '__pycache__')]
    rels += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith('.py')]
  return root, sorted(r.replace(os.sep, '/') for r in rels)


def _read_files(root: str, rels: list[str]) -> list[tuple[str, bytes]]:
  docs = []
  for rel in rels:
    path = os.path.join(root, rel)
    try:
      with open(path, 'rb') as f:
        docs.append((rel, f.read()))
    except OSError as e:
      raise DataError(f'corpus file {path} cannot be read: {e.strerror or e}') from None
  return docs


_TEXT_CONTROLS = np.array([ord(c) for c in '\t\n\r\f\v\b\x1b'], np.uint8)


def non_text_share(data: bytes) -> float:
  """Share of bytes that are control characters other than whitespace, backspace and escape.

  Bytes >= 128 count as text: they are UTF-8 or a legacy 8-bit encoding (the stdlib itself
  ships KOI8-R and Latin-1 test modules).
  """
  if not data:
    return 0.0
  arr = np.frombuffer(data, np.uint8)
  return int(np.count_nonzero(((arr < 32) & ~np.isin(arr, _TEXT_CONTROLS)) | (arr == 127))) / len(data)


def looks_binary(data: bytes) -> bool:
  """A NUL byte, or more than BINARY_SHARE of the bytes control characters (see `non_text_share`)."""
  return b'\0' in data or non_text_share(data) > BINARY_SHARE


def screen_binary(docs, source: str, policy: str):
  binary = [k for k, d in docs if looks_binary(d)]
  if not binary:
    return docs
  if policy == 'error':
    raise DataError(f'data.source={source!r}: {len(binary)} document(s) look binary, e.g. {binary[0]!r} (NUL bytes '
                    f"or >{BINARY_SHARE:.0%} control bytes); set data.binary_documents='skip' to leave them out or 'keep'")
  if policy == 'skip':
    log.warning('data.source=%r: skipped %d binary-looking document(s), e.g. %r', source, len(binary), binary[0])
    dropped = set(binary)
    return [(k, d) for k, d in docs if k not in dropped]
  return docs


def _tfds_documents(name: str, split: str, text_key: str, data_dir: str | None) -> list[tuple[str, bytes]]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"data.source='tfds:{name}' needs tensorflow-datasets: pip install -e '.[tfds]' ({e})") from None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # tfds raises many types for a missing dataset
    raise DataError(f"data.source='tfds:{name}' split {split!r} cannot be read: {str(e).splitlines()[0]}") from None
  docs = []
  for i in range(len(source)):
    example = source[i]
    if text_key not in example:
      raise DataError(f'data.tfds_text_key={text_key!r} is not a feature of tfds:{name} ({sorted(example)})')
    text = example[text_key]
    docs.append((f'{i:010d}', text.encode('utf-8') if isinstance(text, str) else bytes(text)))
  return docs


def read_documents(source: str, tfds_split: str = 'train', tfds_text_key: str = 'text',
                   tfds_data_dir: str | None = None) -> list[tuple[str, bytes]]:
  """Reads (key, bytes) documents of a source, sorted by key; raises DataError if none or all empty."""
  if source == 'stdlib':
    root, rels = stdlib_files()
    docs = _read_files(root, rels)
  elif source.startswith('text:'):
    pattern = os.path.expanduser(source[len('text:'):])
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
      raise DataError(f'data.source={source!r} matches no files')
    docs = _read_files('', paths)
  elif source.startswith('tfds:'):
    docs = _tfds_documents(source[len('tfds:'):], tfds_split, tfds_text_key, tfds_data_dir)
  else:
    raise DataError(f'data.source={source!r} is not stdlib, text:GLOB or tfds:NAME')
  docs = [(k, d) for k, d in docs if d]
  if not docs:
    raise DataError(f'data.source={source!r} has no non-empty documents')
  return docs
