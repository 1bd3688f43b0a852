"""Preparing a token store: plan, tokenize chunks in parallel, finalize (`python -m moejax.prepare`).

1. Plan (one process, one read pass, no tokenizing): walk the source's documents in order,
   screen binary ones, fingerprint them, cut them into chunks of about `chunk_bytes`, and
   choose the held-out documents with the same rule as in-memory corpora (`split_keys`).
   A 'train:' tokenizer is trained here on the training documents. Written to plan.json.
2. Chunks (any number of worker processes and of independent jobs; `chunks.py`): chunk i
   re-reads its documents, tokenizes them and writes its shards, then chunks/i.json, each
   under a temporary name renamed into place, so a killed job leaves no partial chunk; a
   rerun skips finished chunks. Job j of `--num_shards=n` takes chunks i with i % n == j.
3. Finalize (whichever job finishes the last chunk): checks every chunk and writes
   manifest.json last. Its content is a function of the plan and the chunks only, so any
   number of workers or jobs gives a byte-identical store.

Ownership (`locking.py`): DIR/.lock is held while a run plans, checks a complete store or
finalizes, so a second run waits for the plan and is then refused if its settings differ;
chunks/i.lock is held while chunk i is made, so concurrent runs with the same settings share
the chunks (each made once) instead of all doing every one. A rerun on a complete store
checks every shard's sha256 and re-makes the missing or damaged ones (the repair the error
messages of `store.py` give). An OSError (a full disk) is one DataError line; the driver's
SIGTERM and Ctrl-C stop the workers cleanly (`chunk_pool.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time

import numpy as np

from moejax import files
from moejax.data import chunk_pool, chunks as chunk_lib, locking, store as store_lib
from moejax.data import tokenizers as tok_lib
from moejax.data.sources import Position, SourceOptions, iter_documents
from moejax.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # source bytes per chunk (the unit of parallel work and of a shard file)
TOKENIZER_TRAIN_BYTES = 200 << 20  # a 'train:' tokenizer sees at most this many training bytes, in order
LOCK = '.lock'


def split_keys(sizes: list[tuple[str, int]], heldout_bytes: int, max_fraction: float) -> set[str]:
  """The held-out document keys.

  Documents are walked in sha256(key) order and each one that still fits under
  cap = min(heldout_bytes, max_fraction * total bytes) joins the held-out split. The split
  depends only on the keys, sizes and the two numbers: deterministic, and one large
  document can never become the whole held-out set.
  """
  total = sum(n for _, n in sizes)
  cap = min(heldout_bytes, int(max_fraction * total))
  held, size = set(), 0
  for key, n in sorted(sizes, key=lambda kn: hashlib.sha256(kn[0].encode()).hexdigest()):
    if size + n <= cap:
      held.add(key)
      size += n
  return held


# A HuggingFace tokenizer encodes a special token's text inside a document as text (since 2026-12-06; before, it
# became the special id, a false document start): the tokens depend on that rule, so the fingerprint and a store's
# settings name it for HF-loaded tokenizers (a store or run prepared under the old rule is refused, not mixed).
HF_SPECIAL_TOKENS = 'as_text'


def combined_fingerprint(docs_fingerprint: str, tokenizer: tok_lib.Tokenizer) -> str:
  """The corpus fingerprint: the documents' for bytes (as it always was), else documents + tokenizer (+ the HF
  special-token rule)."""
  if tokenizer.kind == 'bytes':
    return docs_fingerprint
  rule = f':special_tokens_{HF_SPECIAL_TOKENS}' if tokenizer.kind == 'hf' else ''
  return hashlib.sha256(f'{docs_fingerprint}:{tokenizer.hash}:{tokenizer.separator}{rule}'.encode()).hexdigest()


def tokenizer_id(spec: tok_lib.Spec) -> str:
  """What identifies a tokenizer in a store's settings: the spec, or a file's sha256 (not its path)."""
  if spec.is_file:
    return f'{spec.kind}:sha256:{tok_lib.file_hash(spec.path)}' if os.path.isfile(spec.path) else f'{spec.kind}:{spec.path}'
  return 'bytes' if spec.kind == 'bytes' else f'train:{spec.train_kind}:{spec.vocab_size}'


def heldout_warnings(source: str, heldout_bytes: int, max_fraction: float, total: int, held: int) -> None:
  if max_fraction * total < heldout_bytes:
    log.warning('data.heldout_bytes=%d is more than data.heldout_max_fraction=%g of the corpus (%d bytes): the '
                'held-out split holds %d bytes', heldout_bytes, max_fraction, total, held)
  elif held < heldout_bytes // 2:
    log.warning('the held-out split of %s holds only %d of data.heldout_bytes=%d bytes (its documents are larger '
                'than what was left)', source, held, heldout_bytes)


def check_split(source: str, held_docs: int, train_docs: int, heldout_bytes: int, max_fraction: float,
                total: int) -> None:
  if not held_docs:
    raise DataError(f'data.source={source!r}: no document fits a held-out split of at most {heldout_bytes:,} bytes '
                    f'({max_fraction:.0%} of {total:,}); raise data.heldout_bytes or add smaller documents')
  if not train_docs:
    raise DataError(f'data.heldout_bytes={heldout_bytes} takes every document of {source!r}; none left to train on')


# --- 1. plan ---------------------------------------------------------------------------------------------------


def settings_of(opts: SourceOptions, spec: tok_lib.Spec, separator_token, heldout_bytes, max_fraction,
                chunk_bytes=CHUNK_BYTES, dtype='auto', tokenizer_train_bytes=TOKENIZER_TRAIN_BYTES) -> dict:
  """Everything a store's content depends on besides the documents (plan.json `settings`)."""
  return {'source': opts.source, 'tfds_split': opts.tfds_split, 'tfds_text_key': opts.tfds_text_key,
          'text_field': opts.text_field, 'binary_documents': opts.binary_documents,
          'tokenizer': tokenizer_id(spec), 'separator_token': separator_token, 'heldout_bytes': int(heldout_bytes),
          'heldout_max_fraction': float(max_fraction), 'chunk_bytes': int(chunk_bytes), 'dtype': dtype,
          'tokenizer_train_bytes': int(tokenizer_train_bytes),
          **({'special_tokens': HF_SPECIAL_TOKENS} if spec.kind == 'hf' or spec.train_kind == 'bpe' else {})}


def make_plan(directory: str, opts: SourceOptions, spec: tok_lib.Spec, settings: dict) -> dict:
  """Reads the source once, writes the tokenizer and plan.json into `directory`; returns the plan."""
  t0 = time.time()
  fingerprint = hashlib.sha256()
  sizes, chunks, skipped = [], [], []
  start, chunk_hash, chunk_docs, chunk_bytes = Position(), hashlib.sha256(), 0, 0
  for position, key, data in iter_documents(opts, skipped=skipped):
    chunk_lib.doc_hash_update(fingerprint, key, data)
    chunk_lib.doc_hash_update(chunk_hash, key, data)
    sizes.append((key, len(data)))
    chunk_docs, chunk_bytes = chunk_docs + 1, chunk_bytes + len(data)
    if chunk_bytes >= settings['chunk_bytes']:
      chunks.append({'start': start.to_json(), 'docs': chunk_docs, 'bytes': chunk_bytes, 'sha256': chunk_hash.hexdigest()})
      start, chunk_hash, chunk_docs, chunk_bytes = position, hashlib.sha256(), 0, 0
  if chunk_docs:
    chunks.append({'start': start.to_json(), 'docs': chunk_docs, 'bytes': chunk_bytes, 'sha256': chunk_hash.hexdigest()})
  if not sizes:
    raise DataError(f'data.source={opts.source!r} has no non-empty documents')
  if skipped:
    log.warning('data.source=%r: skipped %d binary-looking document(s), e.g. %r', opts.source, len(skipped), skipped[0])
  total = sum(n for _, n in sizes)
  held = split_keys(sizes, settings['heldout_bytes'], settings['heldout_max_fraction'])
  held_bytes = sum(n for k, n in sizes if k in held)
  check_split(opts.source, len(held), len(sizes) - len(held), settings['heldout_bytes'],
              settings['heldout_max_fraction'], total)
  heldout_warnings(opts.source, settings['heldout_bytes'], settings['heldout_max_fraction'], total, held_bytes)
  log.info('plan: %d documents, %.1f MB in %d chunks, %d held out (%.2f MB), read in %.1f s', len(sizes), total / 1e6,
           len(chunks), len(held), held_bytes / 1e6, time.time() - t0)

  tokenizer_file = _install_tokenizer(directory, opts, spec, held, settings)
  tokenizer = chunk_lib.installed_tokenizer(directory, tokenizer_file, settings['tokenizer'],
                                  settings['separator_token'])  # the store's own copy
  _check_trained_vocab(spec, tokenizer, directory)
  dtype = _dtype(settings['dtype'], tokenizer.vocab_size, directory)
  docs_fp = fingerprint.hexdigest()
  plan = {'format': store_lib.FORMAT, 'version': store_lib.VERSION, 'settings': settings,
          'tokenizer': {**tokenizer.describe(), 'spec': settings['tokenizer'], 'file': tokenizer_file},
          'dtype': dtype.name, 'docs_fingerprint': docs_fp, 'fingerprint': combined_fingerprint(docs_fp, tokenizer),
          'documents': len(sizes), 'bytes': total, 'skipped_binary': len(skipped),
          'heldout': {'docs': len(held), 'bytes': held_bytes}, 'heldout_keys': sorted(held), 'chunks': chunks}
  files.atomic_write_json(os.path.join(directory, 'plan.json'), plan)
  return plan


def _dtype(requested: str, vocab_size: int, directory: str) -> np.dtype:
  if requested == 'auto':
    return tok_lib.dtype_for(vocab_size)
  dtype = np.dtype(requested)
  if vocab_size > np.iinfo(dtype).max + 1:
    raise DataError(f'--dtype={requested} cannot hold a vocabulary of {vocab_size} tokens (store {directory}); '
                    'use --dtype=uint32 or auto')
  return dtype


def _install_tokenizer(directory: str, opts: SourceOptions, spec: tok_lib.Spec, held: set[str],
                       settings: dict) -> str | None:
  """Copies a tokenizer file into the store, or trains one there; returns its file name (None for bytes)."""
  if spec.kind == 'bytes':
    return None
  if spec.is_file:
    tok_lib.load(spec, separator_token=settings['separator_token'])  # fails with one line before copying
    name = 'tokenizer.json' if spec.kind == 'hf' else 'tokenizer.model'
    with files.atomic_path(os.path.join(directory, name)) as tmp:
      shutil.copyfile(spec.path, tmp)
    return name
  name = tok_lib.TRAIN_KINDS[spec.train_kind]
  t0 = time.time()
  budget = settings['tokenizer_train_bytes']
  seen = 0

  def texts():
    nonlocal seen
    for _, key, data in iter_documents(opts):
      if key in held:
        continue
      if seen >= budget:
        return
      seen += len(data)
      yield data

  tok_lib.train(spec, texts(), os.path.join(directory, name))
  log.info('trained tokenizer train:%s:%d on %d bytes of training documents (the cap, --tokenizer_train_bytes, is '
           '%d) in %.1f s', spec.train_kind, spec.vocab_size, seen, budget, time.time() - t0)
  return name


def _check_trained_vocab(spec: tok_lib.Spec, tokenizer: tok_lib.Tokenizer, directory: str) -> None:
  if spec.kind == 'train' and tokenizer.vocab_size < spec.vocab_size:
    log.warning('tokenizer train:%s:%d learned only %d tokens from the training text (too little text for more): '
                'the store %s has a vocabulary of %d', spec.train_kind, spec.vocab_size, tokenizer.vocab_size,
                directory, tokenizer.vocab_size)


def _repair_complete_store(directory: str, settings: dict) -> dict | None:
  """A complete store with `settings`: its manifest if intact; else (damaged) it is made incomplete, None."""
  manifest = store_lib.read_manifest(directory)
  _check_settings(directory, manifest['settings'], settings)
  t0 = time.time()
  damaged = chunk_lib.damaged_chunks(directory, manifest)
  if not damaged:
    log.info('token store %s is complete: every shard matches its sha256 (checked in %.1f s)', directory,
             time.time() - t0)
    return manifest
  log.warning('token store %s: %d damaged chunk(s), e.g. %s; re-making them', directory, len(damaged), damaged[0][1])
  os.remove(os.path.join(directory, store_lib.MANIFEST))  # unreadable until repaired
  for i, _ in damaged:
    with contextlib.suppress(OSError):
      os.remove(os.path.join(directory, 'chunks', chunk_lib.chunk_name(i) + '.json'))
  return None


# --- the driver ------------------------------------------------------------------------------------------------


def _check_settings(directory: str, have: dict, want: dict) -> None:
  if have != want:
    changed = [f'{k} ({have.get(k)!r} -> {v!r})' for k, v in want.items() if have.get(k) != v]
    raise DataError(f'{directory} holds a preparation with other settings: {", ".join(changed)}; '
                    'use another directory or delete it')


def load_or_make_plan(directory: str, opts: SourceOptions, spec: tok_lib.Spec, settings: dict,
                      make: bool = True) -> dict:
  path = os.path.join(directory, 'plan.json')
  if os.path.exists(path):
    plan = files.read_json(path, 'preparation plan')
    if plan.get('version') != store_lib.VERSION:
      raise DataError(f'{path} has format version {plan.get("version")}, this moejax writes {store_lib.VERSION}; '
                      'prepare into a new directory')
    _check_settings(directory, plan['settings'], settings)
    return plan
  if not make:
    raise DataError(f'{path} does not exist: run the same command with --plan_only once before the sharded jobs '
                    '(the script from --emit does)')
  return make_plan(directory, opts, spec, settings)


def _store_lock(directory: str) -> locking.Lock:
  return locking.acquire(os.path.join(directory, LOCK), make_parent=True, on_wait=lambda holder: log.warning(
      'token store %s is being planned, checked or finalized by %s; waiting for it', directory, holder))


def prepare(directory: str, opts: SourceOptions, tokenizer: str = 'bytes', heldout_bytes: int = 131072,
            heldout_max_fraction: float = 0.1, chunk_bytes: int = CHUNK_BYTES, dtype: str = 'auto', workers: int = 1,
            num_shards: int = 1, shard_index: int = 0, plan_only: bool = False, separator_token: str | None = None,
            tokenizer_train_bytes: int = TOKENIZER_TRAIN_BYTES, progress: bool = True) -> dict | None:
  """Prepares (or resumes, or repairs) the store in `directory`; its manifest, or None while shards are pending."""
  spec = tok_lib.parse_spec(tokenizer) if isinstance(tokenizer, str) else tokenizer
  if spec.is_file and not os.path.isfile(spec.path):
    raise DataError(f'tokenizer file {spec.path} does not exist')
  if not 0 <= shard_index < num_shards:
    raise DataError(f'--shard_index={shard_index} must be in [0, --num_shards={num_shards})')
  settings = settings_of(opts, spec, separator_token, heldout_bytes, heldout_max_fraction, chunk_bytes, dtype,
                         tokenizer_train_bytes)
  try:
    return _prepare(directory, opts, spec, settings, workers, num_shards, shard_index, plan_only, progress)
  except OSError as e:  # a full disk, a vanished directory: what is finished stays
    where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
    raise DataError(f'writing the token store {directory} failed: {e.strerror or e}{where}; '
                    f'{chunk_lib.progress_note(directory)}') from None


def _prepare(directory, opts, spec, settings, workers, num_shards, shard_index, plan_only, progress):
  created = not os.path.exists(directory)
  try:
    with _store_lock(directory):
      if os.path.exists(os.path.join(directory, store_lib.MANIFEST)):
        manifest = _repair_complete_store(directory, settings)
        if manifest is not None:
          return manifest
      plan = load_or_make_plan(directory, opts, spec, settings, make=num_shards == 1 or plan_only)
      for sub in (*store_lib.SPLITS, 'chunks'):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
  except BaseException:
    if created and not os.path.exists(os.path.join(directory, 'plan.json')):
      shutil.rmtree(directory, ignore_errors=True)  # a first plan that failed leaves no skeleton behind
    raise
  if plan_only:
    return None
  fp = chunk_lib.plan_fingerprint(plan)
  mine = [i for i in range(len(plan['chunks'])) if i % num_shards == shard_index]
  todo = [i for i in mine if chunk_lib.chunk_done(directory, i, fp) is None]
  if todo:
    _run_chunks(directory, plan, todo, len(mine) - len(todo), workers, progress, opts.tfds_data_dir)
  with _store_lock(directory):
    manifest = chunk_lib.finalize(directory, plan)
  if manifest is None and num_shards == 1:
    raise DataError(f'token store {directory}: chunks went missing while it was prepared (removed by another '
                    'process?); rerun the same command')
  return manifest


def _wait_for_chunk(directory: str, i: int, fp: str, tfds_data_dir: str | None) -> tuple[dict, bool]:
  """Chunk i, which another process was making: waits for it, and makes it if that process did not finish it."""
  while True:
    with locking.acquire(chunk_lib.chunk_lock(directory, i), on_wait=lambda holder: log.info(
        'chunk %s is being made by %s; waiting for it', chunk_lib.chunk_name(i), holder)):
      pass
    record = chunk_lib.chunk_done(directory, i, fp)
    if record is not None:
      return record, False
    record, made = chunk_lib.chunk_job(directory, i, tfds_data_dir)
    if record is not None:
      return record, made


def _run_chunks(directory: str, plan: dict, todo: list[int], done: int, workers: int, progress: bool,
                tfds_data_dir: str | None) -> None:
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  total = sum(plan['chunks'][i]['bytes'] for i in todo)
  bar = tqdm(total=total, unit='B', unit_scale=True, desc=f'prepare {os.path.basename(directory.rstrip("/"))}',
             disable=not progress, file=sys.stderr, mininterval=1.0, smoothing=0.1)
  if done:
    log.info('resuming: %d chunk(s) of this job already done, %d to go', done, len(todo))
  t0, tokens, made, busy = time.time(), 0, [], []

  def advance(args, result):
    nonlocal tokens
    record, here = result
    i = args[1]
    if record is None:
      busy.append(i)
      return
    if here:
      made.append(i)
      tokens += sum(record['splits'][s]['tokens'] for s in store_lib.SPLITS)
    bar.update(plan['chunks'][i]['bytes'])
    bar.set_postfix_str(f'{tokens / max(time.time() - t0, 1e-9) / 1e6:.2f}M tokens/s', refresh=False)

  try:
    chunk_pool.run(chunk_lib.chunk_job, [(directory, i, tfds_data_dir) for i in todo], workers, advance)
    fp = chunk_lib.plan_fingerprint(plan)
    for i in busy:
      advance((directory, i), _wait_for_chunk(directory, i, fp, tfds_data_dir))
  finally:
    bar.close()
    for i in todo:  # what a stopped worker left (a SIGKILL leaves temporary files)
      chunk_lib.sweep_chunk(directory, i)
  others = len(todo) - len(made)
  log.info('prepared %d chunk(s): %d tokens in %.1f s (%.2fM tokens/s)%s', len(made), tokens, time.time() - t0,
           tokens / max(time.time() - t0, 1e-9) / 1e6,
           f'; {others} chunk(s) were made by another process meanwhile' if others else '')
