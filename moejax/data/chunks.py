"""Making a token store's chunks, and checking them: records, ownership, temporary files, finalize, verify.

Chunk i of a plan (`preparation.py` makes the plan) is made by whoever holds chunks/i.lock
(`locking.py`): it re-reads its documents from its recorded position, checks they are the
planned ones (sha256), tokenizes them and writes train/i.bin and heldout/i.bin (temporary
files renamed into place), then chunks/i.json. The record carries the plan's fingerprint
(`plan_fingerprint`): a record of another plan is not a finished chunk, and `verify_store`
refuses a store that mixes preparations. A chunk's owner removes what killed writers of that
chunk left (temporary files), so a store that is done holds none, nor any lock file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os

import numpy as np

from moejax import files
from moejax.data import chunk_pool, locking, store as store_lib
from moejax.data import tokenizers as tok_lib
from moejax.data.sources import Position, SourceOptions, iter_documents
from moejax.errors import DataError

ENCODE_BATCH_BYTES = 4 << 20  # source bytes tokenized per call


def doc_hash_update(h, key: str, data: bytes) -> None:
  """The corpus fingerprint's per-document update: key, length, bytes."""
  h.update(key.encode() + b'\0' + str(len(data)).encode() + b'\0')
  h.update(data)


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


_WORKER = {}


def chunk_name(i: int) -> str:
  return f'{i:06d}'


def chunk_lock(directory: str, i: int) -> str:
  return os.path.join(directory, 'chunks', chunk_name(i) + '.lock')


def read_record(directory: str, i: int) -> dict | None:
  try:
    return files.read_json(os.path.join(directory, 'chunks', chunk_name(i) + '.json'), 'chunk record')
  except DataError:
    return None


def chunk_done(directory: str, i: int, plan_fp: str) -> dict | None:
  """The record of chunk i, finished for the plan `plan_fp` with its shard files in place, else None."""
  record = read_record(directory, i)
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
  name = chunk_name(i)
  for sub, target in [(split, name + '.bin') for split in store_lib.SPLITS] + [('chunks', name + '.json')]:
    folder = glob.escape(os.path.join(directory, sub))
    for pattern in (f'.{glob.escape(target)}.*{files.TMP_SUFFIX}', f'{glob.escape(target)}.tmp-*'):
      for tmp in glob.glob(os.path.join(folder, pattern)):
        with contextlib.suppress(OSError):
          os.remove(tmp)


def chunk_job(directory: str, i: int, tfds_data_dir: str | None = None) -> tuple[dict | None, bool]:
  """(record, made here) of chunk i, made unless it is done; (None, False) while another process makes it."""
  w = _worker_plan(directory)
  claim = locking.acquire(chunk_lock(directory, i), wait=False)
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
  return chunk_job(directory, i, tfds_data_dir)[0]


def _make_chunk(directory: str, i: int, w: dict, tfds_data_dir: str | None) -> dict:
  """Tokenizes chunk i and writes its shards (temporary files renamed into place), then its record."""
  plan, held, tokenizer = w['plan'], w['held'], w['tokenizer']
  s = plan['settings']
  opts = SourceOptions(s['source'], s['tfds_split'], s['tfds_text_key'], tfds_data_dir, s['text_field'],
                       s['binary_documents'])
  chunk = plan['chunks'][i]
  dtype = np.dtype(plan['dtype'])
  name = chunk_name(i)
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
    sweep_chunk(directory, i)
  return manifest


def damaged_chunks(directory: str, manifest: dict) -> list[tuple[int, str]]:
  """(chunk, what is wrong) for every chunk whose record or shards do not match the manifest (sha256 of all)."""
  dtype, vocab, fp = np.dtype(manifest['dtype']), int(manifest['tokenizer']['vocab_size']), manifest.get('plan')
  damaged = []
  for i in range(len(manifest['splits']['train']['shards'])):
    record = read_record(directory, i)
    if record is None:
      damaged.append((i, f'chunks/{chunk_name(i)}.json is missing or unreadable'))
      continue
    if fp is None or record.get('plan') != fp:  # (no fingerprint: made by an older moejax, provenance unknown)
      damaged.append((i, f'chunk {chunk_name(i)} was made by another preparation (plan fingerprint '
                         f'{str(record.get("plan"))[:12]}, the manifest\'s {fp[:12]}): the store mixes preparations'))
      continue
    for split in store_lib.SPLITS:
      entry = manifest['splits'][split]['shards'][i]
      problem = store_lib.shard_problem(os.path.join(directory, entry['file']), entry, dtype, vocab, full=True)
      if problem is None and record['splits'][split]['sha256'] != entry['sha256']:
        problem = f'chunks/{chunk_name(i)}.json and the manifest record different shards'
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


def progress_note(directory: str) -> str:
  """How far the preparation in `directory` got, for the line of an interrupted or failed run."""
  try:
    plan = files.read_json(os.path.join(directory, 'plan.json'), 'preparation plan')
    fp = plan_fingerprint(plan)
    done = sum(chunk_done(directory, i, fp) is not None for i in range(len(plan['chunks'])))
  except (DataError, OSError, KeyError, TypeError):
    return 'nothing was prepared yet'
  return f'{done} of {len(plan["chunks"])} chunks of {directory} are done and kept: rerun the same command to resume'


def sweep_chunk(directory: str, i: int) -> None:
  """Removes chunk i's temporary and lock files, unless a live process owns the chunk."""
  claim = locking.acquire(chunk_lock(directory, i), wait=False)
  if claim is not None:
    with claim:
      _remove_chunk_temps(directory, i)
