"""Preparing a token store: plan, tokenize chunks in parallel, finalize (`python -m moejax.prepare`).

1. Plan (one process, one read pass, no tokenizing): walk the source's documents in order,
   screen binary ones, fingerprint them, cut them into chunks of about `chunk_bytes`, and
   choose the held-out documents with the same rule as in-memory corpora (`split_keys`).
   A 'train:' tokenizer is trained here on the training documents. Written to plan.json.
2. Chunks (any number of worker processes and of independent jobs): chunk i re-reads its
   documents from its recorded position, checks they are the planned ones (sha256),
   tokenizes them and writes train/i.bin and heldout/i.bin, then chunks/i.json. Every file
   is written under a temporary name and renamed, so a killed job leaves no partial chunk;
   a rerun skips finished chunks. Job j of `--num_shards=n` takes chunks i with i % n == j.
3. Finalize (whichever job finishes the last chunk): checks every chunk and writes
   manifest.json last. Its content is a function of the plan and the chunks only, so any
   number of workers or jobs gives a byte-identical store.

Ownership (`locking.py`): DIR/.lock is held while a run plans, checks a complete store or
finalizes, so a second run waits for the plan and is then refused if its settings differ;
chunks/i.lock is held while chunk i is made, so concurrent runs with the same settings share
the chunks (each made once) instead of all doing every one. Every chunk record carries the
plan's fingerprint (`plan_fingerprint`): a record of another plan is not a finished chunk,
and `verify` refuses a store that mixes preparations. A rerun on a complete store checks
every shard's sha256 and re-makes the missing or damaged ones (the repair the error
messages of `store.py` give).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from moejax import files
from moejax.data import chunk_pool, locking, store as store_lib
from moejax.data import tokenizers as tok_lib
from moejax.data.sources import Position, SourceOptions, iter_documents
from moejax.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # source bytes per chunk (the unit of parallel work and of a shard file)
TOKENIZER_TRAIN_BYTES = 200 << 20  # a 'train:' tokenizer sees at most this many training bytes, in order
ENCODE_BATCH_BYTES = 4 << 20
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


def doc_hash_update(h, key: str, data: bytes) -> None:
  """The corpus fingerprint's per-document update: key, length, bytes."""
  h.update(key.encode() + b'\0' + str(len(data)).encode() + b'\0')
  h.update(data)


def combined_fingerprint(docs_fingerprint: str, tokenizer: tok_lib.Tokenizer) -> str:
  """The corpus fingerprint: the documents' for bytes (as it always was), else documents + tokenizer."""
  if tokenizer.kind == 'bytes':
    return docs_fingerprint
  return hashlib.sha256(f'{docs_fingerprint}:{tokenizer.hash}:{tokenizer.separator}'.encode()).hexdigest()


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
          'tokenizer_train_bytes': int(tokenizer_train_bytes)}


def make_plan(directory: str, opts: SourceOptions, spec: tok_lib.Spec, settings: dict) -> dict:
  """Reads the source once, writes the tokenizer and plan.json into `directory`; returns the plan."""
  t0 = time.time()
  fingerprint = hashlib.sha256()
  sizes, chunks, skipped = [], [], []
  start, chunk_hash, chunk_docs, chunk_bytes = Position(), hashlib.sha256(), 0, 0
  for position, key, data in iter_documents(opts, skipped=skipped):
    doc_hash_update(fingerprint, key, data)
    doc_hash_update(chunk_hash, key, data)
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
  tokenizer = installed_tokenizer(directory, tokenizer_file, settings['tokenizer'],
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


def plan_fingerprint(plan: dict) -> str:
  """sha256 of everything a plan decided (settings, tokenizer and its hash, dtype, chunks, split)."""
  return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def installed_tokenizer(directory: str, file: str | None, spec_id: str, separator_token: str | None,
                        expected_hash: str | None = None) -> tok_lib.Tokenizer:
  """The tokenizer file `file` of a store (None: bytes). Trained tokenizers bring their own separator
  (`separator_token` applies to a user's file only); with `expected_hash` the file must match it."""
  if file is None:
    return tok_lib.ByteTokenizer()
  path = os.path.join(directory, file)
  if spec_id.startswith('train:'):
    separator_token = tok_lib.TRAINED_BPE_SEPARATOR if spec_id.startswith('train:bpe') else None
  kind = 'hf' if file.endswith('.json') else 'sentencepiece'
  tokenizer = tok_lib.load(tok_lib.Spec(kind, path=path), separator_token=separator_token)
  if expected_hash is not None and tokenizer.hash != expected_hash:
    raise DataError(f'tokenizer file {path} does not match the sha256 its store recorded (damaged store)')
  return tokenizer


def store_tokenizer(directory: str, manifest: dict) -> tok_lib.Tokenizer:
  """The tokenizer a store (or plan) was prepared with, loaded from the store's own copy."""
  info = manifest['tokenizer']
  return installed_tokenizer(directory, info['file'], info['spec'], manifest['settings']['separator_token'],
                             info['hash'])


# --- 2. chunks -------------------------------------------------------------------------------------------------

_WORKER = {}


def _chunk_name(i: int) -> str:
  return f'{i:06d}'


def _chunk_lock(directory: str, i: int) -> str:
  return os.path.join(directory, 'chunks', _chunk_name(i) + '.lock')


def _read_record(directory: str, i: int) -> dict | None:
  try:
    return files.read_json(os.path.join(directory, 'chunks', _chunk_name(i) + '.json'), 'chunk record')
  except DataError:
    return None


def chunk_done(directory: str, i: int, plan_fp: str) -> dict | None:
  """The record of chunk i, finished for the plan `plan_fp` with its shard files in place, else None."""
  record = _read_record(directory, i)
  if record is None or record.get('plan') != plan_fp:
    return None
  try:
    for split in store_lib.SPLITS:
      entry = record['splits'][split]
      if os.path.getsize(os.path.join(directory, entry['file'])) != entry['tokens'] * np.dtype(record['dtype']).itemsize:
        return None
  except (OSError, KeyError, TypeError):
    return None
  return record


def _worker_plan(directory: str) -> dict:
  """The plan, its fingerprint, held-out keys and tokenizer (loaded once per process and plan)."""
  path = os.path.join(directory, 'plan.json')
  try:
    stat = os.stat(path)
  except OSError as e:
    raise DataError(f'preparation plan {path} cannot be read: {e.strerror or e}') from None
  key = (directory, stat.st_ino, stat.st_mtime_ns)
  if _WORKER.get('key') != key:
    plan = files.read_json(path, 'preparation plan')
    _WORKER.clear()
    _WORKER.update(key=key, plan=plan, fp=plan_fingerprint(plan), held=set(plan['heldout_keys']),
                   tokenizer=store_tokenizer(directory, plan))
  return _WORKER


def _remove_chunk_temps(directory: str, i: int) -> None:
  """Removes chunk i's temporary files (the caller owns the chunk, so whoever wrote them is gone)."""
  name = _chunk_name(i)
  for sub, target in [(split, name + '.bin') for split in store_lib.SPLITS] + [('chunks', name + '.json')]:
    folder = glob.escape(os.path.join(directory, sub))
    for pattern in (f'.{glob.escape(target)}.*{files.TMP_SUFFIX}', f'{glob.escape(target)}.tmp-*'):
      for tmp in glob.glob(os.path.join(folder, pattern)):
        with contextlib.suppress(OSError):
          os.remove(tmp)


def _chunk_job(directory: str, i: int, tfds_data_dir: str | None = None) -> tuple[dict | None, bool]:
  """(record, made here) of chunk i, made unless it is done; (None, False) while another process makes it."""
  w = _worker_plan(directory)
  claim = locking.acquire(_chunk_lock(directory, i), wait=False)
  if claim is None:
    return None, False
  with claim:
    record = chunk_done(directory, i, w['fp'])
    if record is not None:
      return record, False
    _remove_chunk_temps(directory, i)
    return _make_chunk(directory, i, w, tfds_data_dir), True


def prepare_chunk(directory: str, i: int, tfds_data_dir: str | None = None) -> dict | None:
  """Makes chunk i of the plan in `directory` unless it is done; its record, or None if another process makes it."""
  return _chunk_job(directory, i, tfds_data_dir)[0]


def _make_chunk(directory: str, i: int, w: dict, tfds_data_dir: str | None) -> dict:
  """Tokenizes chunk i and writes its shards (temporary files renamed into place), then its record."""
  plan, held, tokenizer = w['plan'], w['held'], w['tokenizer']
  s = plan['settings']
  opts = SourceOptions(s['source'], s['tfds_split'], s['tfds_text_key'], tfds_data_dir, s['text_field'],
                       s['binary_documents'])
  chunk = plan['chunks'][i]
  dtype = np.dtype(plan['dtype'])
  name = _chunk_name(i)
  shard_files = {split: os.path.join(split, name + '.bin') for split in store_lib.SPLITS}
  hashes = {split: hashlib.sha256() for split in store_lib.SPLITS}
  counts = {split: {'docs': 0, 'tokens': 0, 'bytes': 0} for split in store_lib.SPLITS}
  chunk_hash = hashlib.sha256()
  pending = {split: [] for split in store_lib.SPLITS}
  with contextlib.ExitStack() as stack:
    outs = {}
    for split in store_lib.SPLITS:  # (closed before renamed: the stack unwinds in reverse)
      tmp = stack.enter_context(files.atomic_path(os.path.join(directory, shard_files[split])))
      stack.enter_context(chunk_pool.temp_registered(tmp))
      outs[split] = stack.enter_context(open(tmp, 'wb'))

    def flush(split):
      if not pending[split]:
        return
      tokens = np.concatenate(tokenizer.encode_documents(pending[split])).astype(dtype)
      raw = tokens.tobytes()
      outs[split].write(raw)
      hashes[split].update(raw)
      counts[split]['tokens'] += int(tokens.size)
      pending[split] = []

    seen, sizes = 0, {split: 0 for split in store_lib.SPLITS}
    for _, key, data in iter_documents(opts, Position.from_json(chunk['start'])):
      if seen == chunk['docs']:
        break
      seen += 1
      doc_hash_update(chunk_hash, key, data)
      split = 'heldout' if key in held else 'train'
      pending[split].append(data)
      counts[split]['docs'] += 1
      counts[split]['bytes'] += len(data)
      sizes[split] += len(data)
      if sizes[split] >= ENCODE_BATCH_BYTES:
        flush(split)
        sizes[split] = 0
    if seen != chunk['docs'] or chunk_hash.hexdigest() != chunk['sha256']:
      raise DataError(f'the documents of chunk {i} of {s["source"]!r} differ from the plan in {directory}/plan.json '
                      '(the source changed since; prepare into a new directory)')
    for split in store_lib.SPLITS:
      flush(split)
  record = {'index': i, 'dtype': dtype.name, 'plan': w['fp'],
            'splits': {split: {'file': shard_files[split], **counts[split], 'sha256': hashes[split].hexdigest()}
                       for split in store_lib.SPLITS}}
  files.atomic_write_json(os.path.join(directory, 'chunks', name + '.json'), record)
  return record


# --- 3. finalize, verify, repair -------------------------------------------------------------------------------


def finalize(directory: str, plan: dict) -> dict | None:
  """Writes manifest.json when every chunk is done; returns it, or None while chunks are missing."""
  fp = plan_fingerprint(plan)
  records = [chunk_done(directory, i, fp) for i in range(len(plan['chunks']))]
  if any(r is None for r in records):
    return None
  splits = {}
  for split in store_lib.SPLITS:
    entries = [r['splits'][split] for r in records]
    splits[split] = {'docs': sum(e['docs'] for e in entries), 'tokens': sum(e['tokens'] for e in entries),
                     'bytes': sum(e['bytes'] for e in entries),
                     'shards': [{'file': e['file'], 'tokens': e['tokens'], 'sha256': e['sha256']} for e in entries]}
  manifest = {k: plan[k] for k in ('format', 'version', 'settings', 'tokenizer', 'dtype', 'docs_fingerprint',
                                   'fingerprint', 'documents', 'bytes', 'skipped_binary')}
  manifest['splits'] = splits
  manifest['plan'] = fp
  files.atomic_write_json(os.path.join(directory, store_lib.MANIFEST), manifest)
  for i in range(len(records)):
    _sweep_chunk(directory, i)
  return manifest


def damaged_chunks(directory: str, manifest: dict) -> list[tuple[int, str]]:
  """(chunk, what is wrong) for every chunk whose record or shards do not match the manifest (sha256 of all)."""
  dtype, vocab, fp = np.dtype(manifest['dtype']), int(manifest['tokenizer']['vocab_size']), manifest.get('plan')
  damaged = []
  for i in range(len(manifest['splits']['train']['shards'])):
    record = _read_record(directory, i)
    if record is None:
      damaged.append((i, f'chunks/{_chunk_name(i)}.json is missing or unreadable'))
      continue
    if record.get('plan') != fp:
      damaged.append((i, f'chunk {_chunk_name(i)} was made by another preparation (plan fingerprint '
                         f'{str(record.get("plan"))[:12]}, the manifest\'s {fp[:12]}): the store mixes preparations'))
      continue
    for split in store_lib.SPLITS:
      entry = manifest['splits'][split]['shards'][i]
      problem = store_lib.shard_problem(os.path.join(directory, entry['file']), entry, dtype, vocab, full=True)
      if problem is None and record['splits'][split]['sha256'] != entry['sha256']:
        problem = f'chunks/{_chunk_name(i)}.json and the manifest record different shards'
      if problem is not None:
        damaged.append((i, problem))
        break
  return damaged


def verify_store(directory: str) -> tuple[dict, dict]:
  """(manifest, streams) of a complete store whose every shard, record and tokenizer match its manifest."""
  manifest = store_lib.read_manifest(directory)
  advice = store_lib.repair_advice(directory, manifest['settings'])
  if manifest.get('plan') is None:
    raise DataError(f'token store {directory} was prepared by an older moejax that recorded no plan fingerprints, '
                    f'so what made its shards cannot be checked; {advice} (it re-makes every chunk)')
  store_tokenizer(directory, manifest)
  damaged = damaged_chunks(directory, manifest)
  if damaged:
    raise DataError(f'token store {directory}: {damaged[0][1]}' +
                    (f' (and {len(damaged) - 1} more damaged chunks)' if len(damaged) > 1 else '') + f'; {advice}')
  return store_lib.open_streams(directory, 'size', manifest)


def _repair_complete_store(directory: str, settings: dict) -> dict | None:
  """A complete store with `settings`: its manifest if intact; else (damaged) it is made incomplete, None."""
  manifest = store_lib.read_manifest(directory)
  _check_settings(directory, manifest['settings'], settings)
  t0 = time.time()
  damaged = damaged_chunks(directory, manifest)
  if not damaged:
    log.info('token store %s is complete: every shard matches its sha256 (checked in %.1f s)', directory,
             time.time() - t0)
    return manifest
  log.warning('token store %s: %d damaged chunk(s), e.g. %s; re-making them', directory, len(damaged), damaged[0][1])
  os.remove(os.path.join(directory, store_lib.MANIFEST))  # unreadable until repaired
  for i, _ in damaged:
    with contextlib.suppress(OSError):
      os.remove(os.path.join(directory, 'chunks', _chunk_name(i) + '.json'))
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


def progress_note(directory: str) -> str:
  """How far the preparation in `directory` got, for the line of an interrupted or failed run."""
  try:
    plan = files.read_json(os.path.join(directory, 'plan.json'), 'preparation plan')
    fp = plan_fingerprint(plan)
    done = sum(chunk_done(directory, i, fp) is not None for i in range(len(plan['chunks'])))
  except (DataError, OSError, KeyError, TypeError):
    return 'nothing was prepared yet'
  return f'{done} of {len(plan["chunks"])} chunks of {directory} are done and kept: rerun the same command to resume'


def prepare(directory: str, opts: SourceOptions, tokenizer: str = 'bytes', heldout_bytes: int = 131072,
            heldout_max_fraction: float = 0.1, chunk_bytes: int = CHUNK_BYTES, dtype: str = 'auto', workers: int = 1,
            num_shards: int = 1, shard_index: int = 0, plan_only: bool = False, separator_token: str | None = None,
            tokenizer_train_bytes: int = TOKENIZER_TRAIN_BYTES, progress: bool = True) -> dict | None:
  """Prepares (or resumes, or repairs) the store in `directory`; its manifest, or None while other shards are pending."""
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
                    f'{progress_note(directory)}') from None


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
  fp = plan_fingerprint(plan)
  mine = [i for i in range(len(plan['chunks'])) if i % num_shards == shard_index]
  todo = [i for i in mine if chunk_done(directory, i, fp) is None]
  if todo:
    _run_chunks(directory, plan, todo, len(mine) - len(todo), workers, progress, opts.tfds_data_dir)
  with _store_lock(directory):
    manifest = finalize(directory, plan)
  if manifest is None and num_shards == 1:
    raise DataError(f'token store {directory}: chunks went missing while it was prepared (removed by another '
                    'process?); rerun the same command')
  return manifest


def _sweep_chunk(directory: str, i: int) -> None:
  """Removes chunk i's temporary and lock files, unless a live process owns the chunk."""
  claim = locking.acquire(_chunk_lock(directory, i), wait=False)
  if claim is not None:
    with claim:
      _remove_chunk_temps(directory, i)


def _wait_for_chunk(directory: str, i: int, fp: str, tfds_data_dir: str | None) -> tuple[dict, bool]:
  """Chunk i, which another process was making: waits for it, and makes it if that process did not finish it."""
  while True:
    with locking.acquire(_chunk_lock(directory, i), on_wait=lambda holder: log.info(
        'chunk %s is being made by %s; waiting for it', _chunk_name(i), holder)):
      pass
    record = chunk_done(directory, i, fp)
    if record is not None:
      return record, False
    record, made = _chunk_job(directory, i, tfds_data_dir)
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
    chunk_pool.run(_chunk_job, [(directory, i, tfds_data_dir) for i in todo], workers, advance)
    fp = plan_fingerprint(plan)
    for i in busy:
      advance((directory, i), _wait_for_chunk(directory, i, fp, tfds_data_dir))
  finally:
    bar.close()
    for i in todo:  # what a stopped worker left (a SIGKILL leaves temporary files)
      _sweep_chunk(directory, i)
  others = len(todo) - len(made)
  log.info('prepared %d chunk(s): %d tokens in %.1f s (%.2fM tokens/s)%s', len(made), tokens, time.time() - t0,
           tokens / max(time.time() - t0, 1e-9) / 1e6,
           f'; {others} chunk(s) were made by another process meanwhile' if others else '')
