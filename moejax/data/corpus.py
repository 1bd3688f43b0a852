"""A tokenized, split corpus: where its token streams come from, and its fingerprint.

Three ways to a `Corpus` (`corpus_from_config`):
  - `data.source='store:DIR'`: a store prepared by `python -m moejax.prepare`, read from disk
    (`store.py`); nothing is tokenized or held in memory.
  - an in-memory source ('stdlib', 'text:', 'jsonl:', 'parquet:', 'tfds:') with the 'bytes'
    tokenizer: read, split and packed in memory (`load_corpus`), as the quickstart does.
  - an in-memory source with a subword tokenizer: prepared once into a store under
    `data.cache_dir` keyed by the source's fingerprint and the settings, then read from there.

Each split is one stream [separator, doc tokens, separator, doc tokens, ...] in document
order; the first two ways give identical streams for the same documents (tested).

The fingerprint is the sha256 of every (key, length, bytes) document in order; with a
subword tokenizer it also covers the tokenizer file's sha256 and separator. It is recorded
in every checkpoint and result (the stdlib differs across Python versions).

Split: documents are walked in sha256(key) order; each one that still fits joins the
held-out set, capped at min(`data.heldout_bytes`, `data.heldout_max_fraction` x corpus
bytes); the rest is training data (`preparation.split_keys`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import time

import numpy as np

from moejax.data import chunks, preparation, store as store_lib, tokenizers as tok_lib
from moejax.data.sources import SourceOptions, read_documents
from moejax.errors import ConfigError, DataError

SEPARATOR = tok_lib.BYTES_SEPARATOR

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenized, split corpus: two token streams (numpy arrays or `store.TokenStream`s) and their tokenizer."""
  name: str
  fingerprint: str
  train_tokens: object  # .size, [a:b] -> np.ndarray
  heldout_tokens: object
  num_train_docs: int
  num_heldout_docs: int
  tokenizer: tok_lib.Tokenizer = dataclasses.field(default_factory=tok_lib.ByteTokenizer)
  store: str | None = None

  def metadata(self) -> dict:
    return {'name': self.name, 'fingerprint': self.fingerprint, 'train_tokens': int(self.train_tokens.size),
            'heldout_tokens': int(self.heldout_tokens.size), 'train_docs': self.num_train_docs,
            'heldout_docs': self.num_heldout_docs, 'tokenizer': self.tokenizer.describe(),
            **({'store': self.store} if self.store else {})}


def fingerprint(docs: list[tuple[str, bytes]]) -> str:
  """sha256 over every (key, length, bytes) in order."""
  h = hashlib.sha256()
  for key, data in docs:
    chunks.doc_hash_update(h, key, data)
  return h.hexdigest()


def split_documents(docs, heldout_bytes: int, max_fraction: float = 1.0):
  """(train, heldout) document lists (the rule of `preparation.split_keys`)."""
  held = preparation.split_keys([(k, len(d)) for k, d in docs], heldout_bytes, max_fraction)
  return [(k, d) for k, d in docs if k not in held], [(k, d) for k, d in docs if k in held]


def pack(docs) -> np.ndarray:
  """One uint16 byte-token stream: SEPARATOR, doc bytes, SEPARATOR, doc bytes, ..."""
  parts = tok_lib.ByteTokenizer().encode_documents([d for _, d in docs])
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


def load_corpus(source: str | SourceOptions, heldout_bytes: int, heldout_max_fraction: float = 1.0,
                **options) -> Corpus:
  """Reads, fingerprints, splits and packs an in-memory corpus of byte tokens (cached per process).

  `source` is a source string (with `SourceOptions` fields as keyword `options`) or options.
  """
  opts = source if isinstance(source, SourceOptions) else SourceOptions(source, **options)
  return _load_corpus(opts, heldout_bytes, heldout_max_fraction)


@functools.lru_cache(maxsize=4)
def _load_corpus(opts: SourceOptions, heldout_bytes: int, heldout_max_fraction: float) -> Corpus:
  t0 = time.time()
  docs = read_documents(opts)
  total = sum(len(d) for _, d in docs)
  train, heldout = split_documents(docs, heldout_bytes, heldout_max_fraction)
  held = sum(len(d) for _, d in heldout)
  preparation.check_split(opts.source, len(heldout), len(train), heldout_bytes, heldout_max_fraction, total)
  preparation.heldout_warnings(opts.source, heldout_bytes, heldout_max_fraction, total, held)
  corpus = Corpus(opts.source, fingerprint(docs), pack(train), pack(heldout), len(train), len(heldout))
  log.info('corpus %s: %d documents, %.1f MB, read in %.1f s; train %d tokens (%d docs), held-out %d tokens (%d docs)',
           opts.source, len(docs), total / 1e6, time.time() - t0, corpus.train_tokens.size, len(train),
           corpus.heldout_tokens.size, len(heldout))
  return corpus


def _check_store_tokenizer(directory: str, manifest: dict, spec_text: str) -> None:
  """A store is read only with the tokenizer the config names (one line naming both otherwise)."""
  spec = tok_lib.parse_spec(spec_text)
  if spec.is_file and not os.path.isfile(spec.path):
    raise DataError(f'tokenizer file {spec.path} does not exist (data.tokenizer)')
  want, have = preparation.tokenizer_id(spec), manifest['settings']['tokenizer']
  if want != have and want != f'{spec.kind}:sha256:{manifest["tokenizer"]["hash"]}':  # (or the store's own file)
    raise DataError(f'token store {directory} was prepared with tokenizer {have}, but data.tokenizer={spec_text!r} '
                    f'is {want}; leave data.tokenizer unset to take the store\'s, or prepare a store with this one')
  hf = manifest['tokenizer'].get('kind') == 'hf'
  if hf and manifest['settings'].get('special_tokens') != preparation.HF_SPECIAL_TOKENS:
    raise DataError(f'token store {directory} was prepared before HF tokenizers encoded special-token text as text '
                    '(docs/data.md); prepare it again into a new directory')


@functools.lru_cache(maxsize=4)
def open_store(directory: str, tokenizer: str = 'bytes', verify: str = 'full') -> Corpus:
  """The corpus of a prepared store (cached per process)."""
  t0 = time.time()
  directory = os.path.abspath(os.path.expanduser(directory))
  manifest = store_lib.read_manifest(directory)
  _check_store_tokenizer(directory, manifest, tokenizer)
  manifest, streams = store_lib.open_streams(directory, verify, manifest)
  tok = chunks.store_tokenizer(directory, manifest)
  splits = manifest['splits']
  corpus = Corpus(f'store:{directory}', manifest['fingerprint'], streams['train'], streams['heldout'],
                  splits['train']['docs'], splits['heldout']['docs'], tok, directory)
  log.info('token store %s: %s tokenizer (vocabulary %d), train %d tokens (%d docs), held-out %d tokens (%d docs); '
           'opened in %.1f s (verify=%s)', directory, tok.kind, tok.vocab_size, streams['train'].size,
           corpus.num_train_docs, streams['heldout'].size, corpus.num_heldout_docs, time.time() - t0, verify)
  return corpus


def default_cache_dir() -> str:
  return os.environ.get('MOEJAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'moejax')


def cached_store(d) -> str:
  """Prepares an in-memory source with a subword tokenizer into the cache (once); returns the store directory."""
  opts = SourceOptions.from_config(d)
  docs = read_documents(opts)
  spec = tok_lib.parse_spec(d.tokenizer)
  settings = {'fingerprint': fingerprint(docs), **preparation.settings_of(
      opts, spec, d.separator_token, d.heldout_bytes, d.heldout_max_fraction, tokenizer_train_bytes=d.tokenizer_train_bytes)}
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
  root = os.path.join(os.path.expanduser(d.cache_dir or default_cache_dir()), 'stores')
  directory = os.path.join(root, key)
  try:
    os.makedirs(root, exist_ok=True)
    lock = open(os.path.join(root, key + '.lock'), 'w')
  except OSError as e:
    raise DataError(f'cannot write the data cache {root} (data.cache_dir): {e.strerror or e}') from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one preparation per store, however many processes ask
    if not os.path.exists(os.path.join(directory, store_lib.MANIFEST)):
      log.info('preparing %s with tokenizer %s into the cache %s', d.source, d.tokenizer, directory)
      preparation.prepare(directory, opts, spec, d.heldout_bytes, d.heldout_max_fraction,
                          separator_token=d.separator_token, tokenizer_train_bytes=d.tokenizer_train_bytes,
                          progress=False)
  return directory


class UnavailableStream:
  """The token stream of a corpus that cannot be opened: any use is the one-line error that says why."""

  def __init__(self, reason: str):
    self.reason = reason

  @property
  def size(self) -> int:
    raise DataError(self.reason)

  def __getitem__(self, index):
    raise DataError(self.reason)


def corpus_from_config(data_cfg, workdir: str | None = None) -> Corpus:
  """The corpus of a `data` config section (a store, in memory, or a cached store).

  With `workdir`, a corpus that cannot be opened (a store that moved, a tokenizer file that is
  gone) falls back to the tokenizer copy the run keeps (`tokenizers.snapshot`): enough to
  sample and export; reading its token streams is the original error.
  """
  try:
    return _corpus_from_config(data_cfg)
  except DataError as e:
    tokenizer = tok_lib.load_snapshot(workdir) if workdir else None
    if tokenizer is None:
      raise
    log.warning('%s; using the copy of the tokenizer in %s (enough to sample and export; scoring and training '
                'need the corpus)', e, os.path.join(workdir, tok_lib.SNAPSHOT_DIR))
    missing = UnavailableStream(f'{e} (the workdir {workdir} keeps only the tokenizer; scoring and training need the '
                                'corpus)')
    return Corpus(data_cfg.source, 'unavailable', missing, missing, 0, 0, tokenizer)


def _corpus_from_config(d) -> Corpus:
  if d.source.startswith('store:'):
    return open_store(d.source[len('store:'):], d.tokenizer, d.verify_store)
  if d.tokenizer == 'bytes':
    return load_corpus(SourceOptions.from_config(d), d.heldout_bytes, d.heldout_max_fraction)
  corpus = open_store(cached_store(d), d.tokenizer, 'size')
  return dataclasses.replace(corpus, name=d.source)


def store_tokenizer_spec(data_cfg) -> tuple[str, str | None]:
  """(data.tokenizer, data.separator_token) that name the tokenizer of a `store:DIR` source's manifest.

  For a store source whose data.tokenizer is left at 'bytes' (the default): the store's own
  tokenizer (a trained spec, or the store's copy of a user's file). A store that cannot be read
  leaves both as they are (opening it reports why).
  """
  d = data_cfg
  directory = os.path.abspath(os.path.expanduser(d.source[len('store:'):]))
  try:
    manifest = store_lib.read_manifest(directory)
    spec, file = manifest['settings']['tokenizer'], manifest['tokenizer'].get('file')
  except (DataError, KeyError, TypeError):
    return d.tokenizer, d.separator_token
  if ':sha256:' in spec and file:
    spec = f'{spec.split(":", 1)[0]}:{os.path.join(directory, file)}'
  return spec, d.separator_token if d.separator_token is not None else manifest['settings'].get('separator_token')


def vocab_size(data_cfg) -> int:
  """The vocabulary the `data` section's tokenizer has (reads a tokenizer file or store manifest if it must)."""
  d = data_cfg
  if d.source.startswith('store:'):
    directory = os.path.abspath(os.path.expanduser(d.source[len('store:'):]))
    manifest = store_lib.read_manifest(directory)
    _check_store_tokenizer(directory, manifest, d.tokenizer)
    return int(manifest['tokenizer']['vocab_size'])
  known = tok_lib.vocab_size_without_io(d.tokenizer)
  return known if known is not None else tok_lib.load(d.tokenizer, separator_token=d.separator_token).vocab_size


def check_vocab(cfg, corpus: Corpus) -> None:
  """model.vocab_size must be the tokenizer's, or above it with `model.allow_padded_vocab` (one line otherwise)."""
  have, want = cfg.model.vocab_size, corpus.tokenizer.vocab_size
  if have == want or (have > want and cfg.model.allow_padded_vocab):
    return
  raise ConfigError(f'model.vocab_size={have} but the tokenizer of {corpus.name} ({corpus.tokenizer.kind}) has {want} '
                    'tokens; leave model.vocab_size unset (None) to take the tokenizer\'s' +
                    (', or set model.allow_padded_vocab=True for unused padding rows' if have > want else ''))
