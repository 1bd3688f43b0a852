"""Document sources: (key, bytes) documents of a corpus, in a fixed order, and the binary-file screen.

Sources (config `data.source`, or `moejax.prepare --source`):
  'stdlib'        the running interpreter's standard library, every `*.py` file under the
                  stdlib directory (site-packages excluded), sorted by relative path;
  'text:GLOB'     your own files, one document per file (recursive `**` allowed), sorted by path;
  'jsonl:GLOB'    JSON-lines files (`.gz` too), one document per line, text in field
                  `data.text_field`; files sorted by path, lines in order;
  'parquet:GLOB'  Parquet files (needs pyarrow: `pip install -e '.[parquet]'`), one document
                  per row of column `data.text_field`;
  'tfds:NAME'     a TensorFlow-Datasets dataset read with `tfds.data_source` (no TensorFlow
                  needed), one document per example, text from `data.tfds_text_key`.
('store:DIR', a prepared token store, is read by `moejax.data.store`, not here.)

Keys: the path relative to the stdlib directory, or for text to the directory before the
glob's first wildcard; `RELPATH:LINE` (10 digits) for JSONL and `RELPATH:ROW` for Parquet;
the index for tfds. The held-out split and the fingerprint hash keys, so they do not move
when a corpus directory does.
Empty documents are left out (blank JSONL lines are not records).

Binary documents: a NUL byte, or more than 5% control bytes (other than whitespace,
backspace and escape), looks binary; `data.binary_documents` says whether that is an error
(default), the document is skipped, or kept.

Reading is positional: `iter_documents(opts, start)` walks from a `Position` (file, record,
byte offset), so a preparation job re-reads only its own chunk of a corpus.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import logging
import os
import sysconfig
from typing import Iterator

import numpy as np

from moejax.errors import DataError

BINARY_SHARE = 0.05  # a document with more control bytes than this share looks binary (random bytes: ~10%)
KINDS = ('stdlib', 'text:', 'jsonl:', 'parquet:', 'tfds:')
BINARY_DOCUMENTS = ('error', 'skip', 'keep')

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SourceOptions:
  """Where documents come from and how they are screened."""
  source: str
  tfds_split: str = 'train'
  tfds_text_key: str = 'text'
  tfds_data_dir: str | None = None
  text_field: str = 'text'
  binary_documents: str = 'error'

  @classmethod
  def from_config(cls, d) -> 'SourceOptions':
    return cls(d.source, d.tfds_split, d.tfds_text_key, d.tfds_data_dir, d.text_field, d.binary_documents)


@dataclasses.dataclass(frozen=True)
class Position:
  """A place in a source's document order: file index, record index in the file, byte offset of that record."""
  file: int = 0
  record: int = 0
  offset: int = 0

  def to_json(self) -> list[int]:
    return [self.file, self.record, self.offset]

  @classmethod
  def from_json(cls, value) -> 'Position':
    return cls(*value)


def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the interpreter's stdlib `*.py` files."""
  root = sysconfig.get_paths()['stdlib']
  rels = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages', '__pycache__')]
    rels += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith('.py')]
  return root, sorted(r.replace(os.sep, '/') for r in rels)


def _glob_files(source: str) -> tuple[str, list[str]]:
  pattern = os.path.expanduser(source.split(':', 1)[1])
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise DataError(f'data.source={source!r} matches no files')
  magic = min([i for i in (pattern.find(c) for c in '*?[') if i >= 0], default=len(pattern))
  return os.path.dirname(pattern[:magic]) or '.', paths


def files_of(source: str) -> tuple[str, list[str]]:
  """(root, files) of a file source; tfds has one pseudo-file ''."""
  if source == 'stdlib':
    root, rels = stdlib_files()
    return root, [os.path.join(root, r) for r in rels]
  if source.startswith(('text:', 'jsonl:', 'parquet:')):
    return _glob_files(source)
  if source.startswith('tfds:'):
    return '', ['']
  raise DataError(f'data.source={source!r} is not stdlib, text:GLOB, jsonl:GLOB, parquet:GLOB or tfds:NAME')


def _read_file(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise DataError(f'corpus file {path} cannot be read: {e.strerror or e}') from None


def _jsonl_records(path: str, rel: str, field: str, start: int, offset: int):
  """(record, offset after it, key, bytes) of the lines of a JSONL file from `start` (at byte `offset`)."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      f.seek(offset)
      line_no = start
      for line in f:
        offset += len(line)
        line_no += 1
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError as e:
          raise DataError(f'{path}, line {line_no}: not a JSON object ({e})') from None
        if not isinstance(record, dict) or field not in record:
          raise DataError(f'{path}, line {line_no}: no text field {field!r} (data.text_field)'
                          + (f'; it has {sorted(record)[:8]}' if isinstance(record, dict) else ''))
        text = record[field]
        if not isinstance(text, str):
          raise DataError(f'{path}, line {line_no}: field {field!r} is {type(text).__name__}, not a string')
        yield line_no, offset, f'{rel}:{line_no - 1:010d}', text.encode('utf-8')
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f'corpus file {path} cannot be read: {getattr(e, "strerror", None) or e}') from None


def _parquet_records(path: str, rel: str, field: str, start: int):
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError("parquet: sources need pyarrow: pip install -e '.[parquet]'") from None
  try:
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
      raise DataError(f'{path}: no text column {field!r} (data.text_field); it has {pf.schema_arrow.names[:8]}')
    row, groups, first = 0, [], 0
    for g in range(pf.num_row_groups):  # the row groups from the one holding row `start` on
      n = pf.metadata.row_group(g).num_rows
      if first + n > start:
        groups.append(g)
      else:
        row = first + n
      first += n
    if not groups:  # (a chunk that starts at the end of this file; pyarrow reads every group for [])
      return
    for batch in pf.iter_batches(columns=[field], row_groups=groups, batch_size=4096):
      for text in batch.column(0).to_pylist():
        row += 1
        if row <= start:
          continue
        if text is not None and not isinstance(text, str):
          raise DataError(f'{path}, row {row - 1}: column {field!r} is {type(text).__name__}, not a string')
        yield row, 0, f'{rel}:{row - 1:010d}', (text or '').encode('utf-8')
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (pyarrow raises many types for a bad file)
    raise DataError(f'corpus file {path} cannot be read as Parquet: {str(e).splitlines()[0]}') from None


def _tfds_source(opts: SourceOptions):
  name = opts.source[len('tfds:'):]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"data.source='tfds:{name}' needs tensorflow-datasets: pip install -e '.[tfds]' ({e})") from None
  try:
    return tfds.data_source(name, split=opts.tfds_split, data_dir=opts.tfds_data_dir)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many types for a missing dataset)
    raise DataError(f"data.source='tfds:{name}' split {opts.tfds_split!r} cannot be read: "
                    f'{str(e).splitlines()[0]}') from None


def _tfds_records(opts: SourceOptions, start: int):
  source = _tfds_source(opts)
  name = opts.source[len('tfds:'):]
  for i in range(start, len(source)):
    example = source[i]
    if opts.tfds_text_key not in example:
      raise DataError(f'data.tfds_text_key={opts.tfds_text_key!r} is not a feature of tfds:{name} ({sorted(example)})')
    text = example[opts.tfds_text_key]
    yield i + 1, 0, f'{i:010d}', text.encode('utf-8') if isinstance(text, str) else bytes(text)


def iter_records(opts: SourceOptions, start: Position = Position()) -> Iterator[tuple[Position, str, bytes]]:
  """(position after, key, bytes) of every record from `start` on, empty ones included, unscreened."""
  root, files = files_of(opts.source)
  kind = opts.source.split(':', 1)[0]
  for fi in range(start.file, len(files)):
    first, offset = (start.record, start.offset) if fi == start.file else (0, 0)
    path = files[fi]
    rel = path if kind == 'tfds' else os.path.relpath(path, root).replace(os.sep, '/')
    if kind in ('stdlib', 'text'):
      if first == 0:
        yield Position(fi + 1, 0, 0), rel, _read_file(path)
      continue
    records = (_jsonl_records(path, rel, opts.text_field, first, offset) if kind == 'jsonl' else
               _parquet_records(path, rel, opts.text_field, first) if kind == 'parquet' else
               _tfds_records(opts, first))
    for record, after, key, data in records:
      yield Position(fi, record, after), key, data


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


def _binary_error(source: str, key: str) -> DataError:
  return DataError(f'data.source={source!r}: document {key!r} looks binary (NUL bytes or >{BINARY_SHARE:.0%} control '
                   "bytes); set data.binary_documents='skip' to leave such documents out or 'keep'")


def iter_documents(opts: SourceOptions, start: Position = Position(),
                   skipped: list | None = None) -> Iterator[tuple[Position, str, bytes]]:
  """(position after, key, bytes) of the non-empty, screened documents from `start` on.

  A binary-looking document raises (policy 'error'), is left out and its key appended to
  `skipped` ('skip'), or kept ('keep').
  """
  for position, key, data in iter_records(opts, start):
    if not data:
      continue
    if opts.binary_documents != 'keep' and looks_binary(data):
      if opts.binary_documents == 'error':
        raise _binary_error(opts.source, key)
      if skipped is not None:
        skipped.append(key)
      continue
    yield position, key, data


def read_documents(source: str | SourceOptions, **options) -> list[tuple[str, bytes]]:
  """Every (key, bytes) document of a source (a string with `SourceOptions` keywords, or options); DataError if none."""
  opts = source if isinstance(source, SourceOptions) else SourceOptions(source, **options)
  skipped = []
  docs = [(key, data) for _, key, data in iter_documents(opts, skipped=skipped)]
  if skipped:
    log.warning('data.source=%r: skipped %d binary-looking document(s), e.g. %r', opts.source, len(skipped), skipped[0])
  if not docs:
    raise DataError(f'data.source={opts.source!r} has no non-empty documents')
  return docs
