"""Tokenizers, the token store, moejax.prepare, and training on a store."""

import filecmp
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moejax import files
from moejax import config as config_lib, data
from moejax.data import chunks, locking, preparation, store as store_lib, tokenizers as tok_lib
from moejax.data.sources import SourceOptions
from moejax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = 'naïve café — 北京 ✓\n\tdef f(x):\n    return x ** 2  # ünïcode\n'


def _prepare(out, source, **kw):
  kw.setdefault('heldout_bytes', 4000)
  kw.setdefault('chunk_bytes', 20_000)  # several chunks, so windows cross shard files
  return preparation.prepare(str(out), SourceOptions(source), progress=False, **kw)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, corpus_glob):
  """A trained BPE store and a trained unigram tokenizer file (trained once for the module)."""
  root = tmp_path_factory.mktemp('trained')
  manifest = _prepare(root / 'bpe', corpus_glob, tokenizer='train:bpe:400')
  tok_lib.train(tok_lib.parse_spec('train:unigram:400'), [d for _, d in data.read_documents(corpus_glob)],
                str(root / 'uni.model'))
  return {'bpe_store': str(root / 'bpe'), 'bpe_json': str(root / 'bpe' / 'tokenizer.json'),
          'unigram': str(root / 'uni.model'), 'manifest': manifest}


@pytest.fixture(scope='module')
def byte_store(tmp_path_factory, corpus_glob):
  out = tmp_path_factory.mktemp('bytes') / 'store'
  _prepare(out, corpus_glob)
  return str(out)


def _tree(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


def _same_store(a, b):
  assert _tree(a) == _tree(b)
  for rel in _tree(a):
    assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False), rel


# --- tokenizers ------------------------------------------------------------------------------------------------


def test_tokenizers_round_trip_text(trained, corpus_glob):
  docs = [TEXT.encode()] + [d for _, d in data.read_documents(corpus_glob)[:5]]
  for tok in (tok_lib.ByteTokenizer(), tok_lib.load(f'hf:{trained["bpe_json"]}'),
              tok_lib.load(f'sentencepiece:{trained["unigram"]}'),
              tok_lib.load('train:bpe:400', trained['bpe_json'])):
    quoted = [f'a page quoting {tok.separator_name()} in its text'.encode()] if tok.kind == 'hf' else []
    for doc, ids in zip(docs + quoted, tok.encode_documents(docs + quoted)):  # a quoted separator is text
      assert ids[0] == tok.separator and (ids[1:] != tok.separator).all()
      assert tok.decode(ids[1:]) == doc, tok.kind
      assert ids.max() < tok.vocab_size
  bpe = tok_lib.load(f'hf:{trained["bpe_json"]}')
  assert bpe.vocab_size == 400 and len(bpe.encode_documents([TEXT.encode()])[0]) < len(TEXT.encode())
  assert tok_lib.load(f'sentencepiece:{trained["unigram"]}').vocab_size == 400


def test_tokenizer_training_is_deterministic(trained, corpus_glob, tmp_path):
  docs = data.read_documents(corpus_glob)
  with open(os.path.join(trained['bpe_store'], 'plan.json')) as f:
    held = set(json.load(f)['heldout_keys'])  # the store's tokenizer saw the training split only
  for kind, path, texts in (('bpe', trained['bpe_json'], [d for k, d in docs if k not in held]),
                            ('unigram', trained['unigram'], [d for _, d in docs])):
    again = str(tmp_path / kind)
    tok_lib.train(tok_lib.parse_spec(f'train:{kind}:400'), texts, again)
    assert tok_lib.file_hash(again) == tok_lib.file_hash(path)


def test_bad_tokenizer_specs_and_files(tmp_path):
  for bad in ('gpt2', 'train:bpe:10', 'train:wordpiece:1000', 'hf:'):
    with pytest.raises(ValueError, match='data.tokenizer'):
      tok_lib.parse_spec(bad)
  junk = tmp_path / 'tokenizer.json'
  junk.write_text('{"not": "a tokenizer"}')
  with pytest.raises(DataError, match=f'tokenizer file {junk} does not load as a HuggingFace'):
    tok_lib.load(f'hf:{junk}')
  with pytest.raises(DataError, match=f'tokenizer file {junk} does not load as a SentencePiece'):
    tok_lib.load(f'sentencepiece:{junk}')
  with pytest.raises(DataError, match='does not exist'):
    tok_lib.load(f'hf:{tmp_path}/missing.json')


def test_scored_bytes_counts_decoded_utf8_bytes(trained):
  """The bits-per-byte denominator is the UTF-8 size of the scored held-out text, for every tokenizer."""
  docs = [TEXT.encode(), 'second döcument ✓'.encode()]
  for tok in (tok_lib.ByteTokenizer(), tok_lib.load(f'hf:{trained["bpe_json"]}')):
    stream = np.concatenate(tok.encode_documents(docs)).astype(np.uint16)
    corpus = data.Corpus('x', 'f', stream, stream, 2, 2, tok)
    assert data.scored_bytes(corpus, 8, 2) == len(docs[0]) + len(docs[1]) == 70 + 20  # (counted by hand)
    # a cut after the first window: the bytes of the first 8 target tokens only
    assert data.scored_bytes(corpus, 8, 1, max_batches=1) == len(tok.decode(stream[1:9]))


# --- the store ---------------------------------------------------------------------------------------------------


def test_byte_store_equals_the_in_memory_corpus(byte_store, corpus_glob):
  memory = data.load_corpus(corpus_glob, 4000, 0.1)
  store = data.open_store(byte_store)
  assert store.fingerprint == memory.fingerprint
  assert len(store.train_tokens.paths) > 2  # several shard files
  np.testing.assert_array_equal(store.train_tokens[0:store.train_tokens.size], memory.train_tokens)
  np.testing.assert_array_equal(store.heldout_tokens[0:store.heldout_tokens.size], memory.heldout_tokens)
  for seq_len in (16, 1000):
    a, b = data.Windows(memory.train_tokens, seq_len), data.Windows(store.train_tokens, seq_len)
    assert len(a) == len(b)
    boundaries = store.train_tokens.starts[1:-1]
    spanning = [i for i in range(len(a)) if any(i * seq_len < s < i * seq_len + seq_len + 1 for s in boundaries)]
    assert spanning  # windows that cross shard files
    for i in spanning + list(range(0, len(a), 97)):
      np.testing.assert_array_equal(a[i], b[i])


def test_store_is_identical_for_any_workers_or_shards(byte_store, corpus_glob, tmp_path):
  _prepare(tmp_path / 'two', corpus_glob, workers=2)
  _same_store(byte_store, tmp_path / 'two')
  sharded = tmp_path / 'sharded'
  assert _prepare(sharded, corpus_glob, plan_only=True) is None
  assert _prepare(sharded, corpus_glob, num_shards=2, shard_index=1) is None  # shard 0 still missing
  assert not os.path.exists(sharded / 'manifest.json')
  with pytest.raises(DataError, match='manifest.json is missing: the preparation of this store has not finished'):
    data.open_store(str(sharded))
  assert _prepare(sharded, corpus_glob, num_shards=2, shard_index=0) is not None
  _same_store(byte_store, sharded)


def test_killed_preparation_resumes_to_the_same_store(byte_store, corpus_glob, tmp_path):
  out = tmp_path / 'killed'
  shutil.copytree(byte_store, out)
  os.remove(out / 'manifest.json')  # as if killed before the end:
  os.remove(out / 'chunks' / '000001.json')  # chunk 1 wrote its shards but not its record,
  with open(out / 'train' / '000002.bin', 'r+b') as f:  # chunk 2 was half-written
    f.truncate(10)
  (out / 'train' / '000003.bin.tmp-999').write_bytes(b'partial')  # temporary files of killed writers,
  (out / 'heldout' / '.000004.bin.999-x1y2.tmp').write_bytes(b'partial')  # (an older moejax's and files.py's)
  (out / 'chunks' / '000005.lock').write_text('pid 999 on a host that died')  # and a dead owner's lock
  with pytest.raises(DataError, match='has not finished'):
    data.open_store(str(out))
  _prepare(out, corpus_glob)
  _same_store(byte_store, out)  # (the rerun removed them)


def test_store_shares_concatenate_and_resume(byte_store):
  corpus = data.open_store(byte_store)
  whole = iter(data.train_dataset(corpus, 16, 8, seed=5))
  shares = [iter(data.train_dataset(corpus, 16, 8, seed=5, rows=r)) for r in ((0, 3), (3, 8))]
  for _ in range(3):
    np.testing.assert_array_equal(np.concatenate([next(s) for s in shares]), next(whole))
  it = iter(data.train_dataset(corpus, 16, 8, seed=5))
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = iter(data.train_dataset(corpus, 16, 8, seed=5))
  again.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(again), e)


def test_multi_epoch_reading_repeats_the_windows(byte_store):
  corpus = data.open_store(byte_store)
  w = len(data.Windows(corpus.train_tokens, 1000))
  it = iter(data.train_dataset(corpus, 1000, 4, seed=1))
  rows = np.concatenate([next(it) for _ in range(-(-2 * w // 4))])
  first, second = sorted(map(bytes, rows[:w])), sorted(map(bytes, rows[w:2 * w]))
  assert first == second and len(set(first)) == w  # every window once per epoch, in a new order


def _damaged(byte_store, tmp_path, name):
  out = tmp_path / name
  shutil.copytree(byte_store, out)
  return out


def test_damaged_stores_are_one_error_naming_the_file(byte_store, tmp_path):
  out = _damaged(byte_store, tmp_path, 'missing')
  os.remove(out / 'train' / '000001.bin')
  with pytest.raises(DataError, match=r'token shard .*train/000001.bin is missing'):
    store_lib.open_streams(str(out))
  out = _damaged(byte_store, tmp_path, 'truncated')
  with open(out / 'train' / '000001.bin', 'r+b') as f:
    f.truncate(1000)
  with pytest.raises(DataError, match=r'token shard .*train/000001.bin has 1000 bytes, the manifest says'):
    store_lib.open_streams(str(out), 'size')
  out = _damaged(byte_store, tmp_path, 'corrupt')
  with open(out / 'train' / '000001.bin', 'r+b') as f:
    f.seek(100)
    f.write(b'\x07\x00')
  with pytest.raises(DataError, match=r'token shard .*train/000001.bin does not match its sha256'):
    store_lib.open_streams(str(out))
  out = _damaged(byte_store, tmp_path, 'version')
  manifest = json.load(open(out / 'manifest.json'))
  files.atomic_write_json(str(out / 'manifest.json'), dict(manifest, version=0))
  with pytest.raises(DataError, match=r'manifest.json has format version 0; this moejax reads version 1'):
    store_lib.read_manifest(str(out))
  with pytest.raises(DataError, match='not a token store'):
    store_lib.read_manifest(str(tmp_path))


def test_store_tokenizer_must_match_the_config(byte_store, trained):
  with pytest.raises(DataError, match=r"prepared with tokenizer bytes, but data.tokenizer='train:bpe:400'"):
    data.open_store(byte_store, 'train:bpe:400')
  data.open_store(trained['bpe_store'], 'train:bpe:400')
  data.open_store(trained['bpe_store'], f'hf:{trained["bpe_json"]}')  # the same file, named by path
  with pytest.raises(DataError, match=r'prepared with tokenizer train:bpe:400, but data.tokenizer=.*sentencepiece'):
    data.open_store(trained['bpe_store'], f'sentencepiece:{trained["unigram"]}')


def test_bad_sources_and_settings(tmp_path, corpus_glob):
  jsonl = tmp_path / 'a.jsonl'
  jsonl.write_text(json.dumps({'text': 'hello ' * 100}) + '\n\n' + json.dumps({'body': 'x'}) + '\n')
  with pytest.raises(DataError, match=rf'{jsonl}, line 3: no text field \'text\''):
    _prepare(tmp_path / 's1', f'jsonl:{jsonl}')
  with pytest.raises(DataError, match='no document fits a held-out split'):
    _prepare(tmp_path / 's2', corpus_glob, heldout_bytes=10)
  words = {f'w{i}': i for i in range(70_000)}
  big = tmp_path / 'big.json'
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.WordLevel(dict(words, **{'<unk>': 70_000, '<|endoftext|>': 70_001}), unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(big))
  with pytest.raises(DataError, match='--dtype=uint16 cannot hold a vocabulary of 70002 tokens'):
    _prepare(tmp_path / 's3', corpus_glob, tokenizer=f'hf:{big}', dtype='uint16')
  manifest = _prepare(tmp_path / 's4', corpus_glob, tokenizer=f'hf:{big}')
  assert manifest['dtype'] == 'uint32' and data.open_store(str(tmp_path / 's4'), f'hf:{big}').tokenizer.vocab_size == 70002
  # A preparation made before HF tokenizers encoded a special token's text as text is refused, not mixed into.
  for name in ('plan.json', 'manifest.json'):
    with open(tmp_path / 's4' / name) as f:
      old = json.load(f)
    assert old['settings']['special_tokens'] == 'as_text'
    del old['settings']['special_tokens']
    with open(tmp_path / 's4' / name, 'w') as f:
      json.dump(old, f)
  with pytest.raises(DataError, match=r"other settings: special_tokens \(None -> 'as_text'\)"):
    _prepare(tmp_path / 's4', corpus_glob, tokenizer=f'hf:{big}')
  data.open_store.cache_clear()
  with pytest.raises(DataError, match='prepared before HF tokenizers encoded special-token text as text'):
    data.open_store(str(tmp_path / 's4'), f'hf:{big}')  # a finished store of the old rule is not trained on either
  _prepare(tmp_path / 's5', corpus_glob, plan_only=True)
  with pytest.raises(DataError, match=r'holds a preparation with other settings: heldout_bytes \(4000 -> 5000\)'):
    _prepare(tmp_path / 's5', corpus_glob, heldout_bytes=5000)
  with pytest.raises(DataError, match=r's4 holds a preparation with other settings: heldout_bytes \(4000 -> 5000\)'):
    _prepare(tmp_path / 's4', corpus_glob, tokenizer=f'hf:{big}', heldout_bytes=5000)
  with pytest.raises(DataError, match=r'other settings: tokenizer \(.*-> \'train:bpe:400\'\), tokenizer_train_bytes'):
    _prepare(tmp_path / 's4', corpus_glob, tokenizer='train:bpe:400', tokenizer_train_bytes=1000)
  assert not {'s1', 's2', 's3'} & set(os.listdir(tmp_path))  # failed first plans leave no skeleton directory


def test_jsonl_and_parquet_sources(tmp_path):
  pa = pytest.importorskip('pyarrow')
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  texts = [f'document {i}: ' + 'lorem ipsum ' * (i % 7 + 1) for i in range(60)]
  (tmp_path / 'j').mkdir()
  for part in range(2):
    with open(tmp_path / 'j' / f'part{part}.jsonl', 'w') as f:
      for t in texts[part * 30:(part + 1) * 30]:
        f.write(json.dumps({'text': t, 'id': 1}) + '\n')
  (tmp_path / 'p').mkdir()
  for part in range(2):
    pq.write_table(pa.table({'text': texts[part * 30:(part + 1) * 30]}), tmp_path / 'p' / f'part{part}.parquet',
                   row_group_size=7)
  a = data.read_documents(f'jsonl:{tmp_path}/j/*.jsonl')
  b = data.read_documents(f'parquet:{tmp_path}/p/*.parquet')
  assert [d.decode() for _, d in a] == [d.decode() for _, d in b] == texts
  assert a[31][0] == 'part1.jsonl:0000000001' and b[31][0] == 'part1.parquet:0000000001'
  for kind in ('jsonl', 'parquet'):  # chunks that start inside files read the same documents
    source = f'{kind}:{tmp_path}/{kind[0]}/*.{kind}'
    whole = data.load_corpus(source, 300, 0.2)
    _prepare(tmp_path / f'{kind}-store', source, heldout_bytes=300, heldout_max_fraction=0.2, chunk_bytes=200)
    store = data.open_store(str(tmp_path / f'{kind}-store'))
    assert store.fingerprint == whole.fingerprint
    np.testing.assert_array_equal(store.train_tokens[0:store.train_tokens.size], whole.train_tokens)


def test_vocabulary_comes_from_the_tokenizer(tiny_cfg, trained):
  cfg = config_lib.apply_overrides(tiny_cfg, {'data.source': f'store:{trained["bpe_store"]}',
                                              'data.tokenizer': 'train:bpe:400', 'model.vocab_size': None})
  assert config_lib.validate(cfg).model.vocab_size == 400
  wrong = config_lib.apply_overrides(cfg, {'model.vocab_size': 257})
  with pytest.raises(ConfigError, match=r'model.vocab_size=257 but the tokenizer of store:.* has 400 tokens'):
    data.check_vocab(wrong, data.corpus_from_config(wrong.data))


def test_in_memory_source_with_a_subword_tokenizer_is_cached_as_a_store(tiny_cfg, tmp_path):
  d = config_lib.apply_overrides(tiny_cfg, {'data.tokenizer': 'train:bpe:400',
                                            'data.cache_dir': str(tmp_path / 'cache')}).data
  corpus = data.corpus_from_config(d)
  assert corpus.tokenizer.vocab_size == 400 and corpus.store.startswith(str(tmp_path / 'cache'))
  again = data.corpus_from_config(d)
  assert again.store == corpus.store and os.listdir(tmp_path / 'cache' / 'stores').count(
      os.path.basename(corpus.store)) == 1


# --- the command line --------------------------------------------------------------------------------------------


def _prepare_cli(*args):
  return subprocess.run([sys.executable, '-m', 'moejax.prepare', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def test_prepare_cli_builds_verifies_and_emits(corpus_glob, byte_store, tmp_path):
  out = _prepare_cli(f'--source={corpus_glob}', f'--out={tmp_path}/cli', '--heldout_bytes=4000',
                     '--chunk_bytes=20000', '--workers=1')
  assert out.returncode == 0, out.stderr
  assert 'train on it with --config.data.source=store:' in out.stdout
  _same_store(byte_store, tmp_path / 'cli')
  verify = _prepare_cli(f'--verify={tmp_path}/cli')
  assert verify.returncode == 0 and 'every shard matches its sha256' in verify.stdout
  for kind, name in (('slurm', 'prepare.slurm'), ('tpu', 'prepare_tpu.sh')):
    out = _prepare_cli(f'--source={corpus_glob}', f'--out={tmp_path}/emit', '--num_shards=3', f'--emit={kind}')
    assert out.returncode == 0, out.stderr
    script = open(tmp_path / 'emit' / name).read()
    assert '--plan_only' in script and '--num_shards=3' in script
    assert ('--array=0-2' in script) if kind == 'slurm' else ('--shard_index=2' in script)


def test_prepare_cli_errors_are_one_line(tmp_path):
  jsonl = tmp_path / 'a.jsonl'
  jsonl.write_text('{"body": "x"}\n')
  for args, message in (([f'--source=jsonl:{jsonl}', f'--out={tmp_path}/x'], "no text field 'text'"),
                        ([f'--source=text:{tmp_path}/none/*', f'--out={tmp_path}/y'], 'matches no files'),
                        ([f'--verify={tmp_path}'], 'not a token store'),
                        (['--source=stdlib', f'--out={tmp_path}/z', '--tokenizer=hf:/nonexistent.json'],
                         'tokenizer file /nonexistent.json does not exist')):
    out = _prepare_cli(*args)
    assert out.returncode == 1, (args, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith('moejax: error: ') and message in lines[-1], out.stderr
    assert 'Traceback' not in out.stderr


# --- training ------------------------------------------------------------------------------------------------------


def test_training_on_a_store_equals_training_in_memory(tiny_cfg, byte_store, tmp_path):
  from moejax.train import loop as loop_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.apply_overrides(tiny_cfg, {'train.steps': 3})
  on_store = config_lib.apply_overrides(cfg, {'data.source': f'store:{byte_store}'})
  losses = []
  for c, name in ((cfg, 'memory'), (on_store, 'store')):
    loop_lib.run(c, str(tmp_path / name))
    with open(tmp_path / name / 'metrics.jsonl') as f:
      losses.append([r['loss'] for r in map(json.loads, f) if 'loss' in r])
  assert len(losses[0]) == 3 and losses[0] == losses[1]  # exactly


def test_tfds_source_prepares_like_in_memory(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=40):
    whole = data.load_corpus('tfds:lm1b', 300, 0.2)
    _prepare(tmp_path / 'tfds', 'tfds:lm1b', heldout_bytes=300, heldout_max_fraction=0.2, chunk_bytes=100)
  store = data.open_store(str(tmp_path / 'tfds'))
  assert store.fingerprint == whole.fingerprint and len(json.load(open(tmp_path / 'tfds' / 'plan.json'))['chunks']) > 2
  np.testing.assert_array_equal(store.train_tokens[0:store.train_tokens.size], whole.train_tokens)


# --- ownership, interruptions, repair --------------------------------------------------------------------------

SLOW_PREPARE = os.path.join(ROOT, 'tests', 'testdata', 'slow_prepare.py')


def _start_slow(out, corpus_glob, *args, chunk_s='0.3', plan_s='0'):
  """moejax.prepare (bytes) in its own session, sleeping `chunk_s` per chunk and `plan_s` in its plan."""
  env = dict(os.environ, SLOW_CHUNK_S=chunk_s, SLOW_PLAN_S=plan_s, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, SLOW_PREPARE, f'--source={corpus_glob}', f'--out={out}',
                           '--heldout_bytes=4000', '--chunk_bytes=20000', '--quiet', *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, timeout=90):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def _leftovers(directory):
  """Temporary and lock files in a store."""
  return [p for p in _tree(directory) if 'tmp' in os.path.basename(p) or p.endswith('.lock')]


def _one_error_line(stderr):
  """The only line of stderr that reports a problem (a traceback, an error, a resource warning)."""
  bad = [l for l in stderr.splitlines() if re.search(r'Traceback|Error|error|leaked|Exception', l)]
  assert len(bad) == 1 and bad[0] == stderr.strip().splitlines()[-1], stderr
  return bad[0]


def test_store_lock_is_exclusive_and_removed_on_release(tmp_path):
  path = str(tmp_path / '.lock')
  held = locking.acquire(path)
  assert 'pid' in open(path).read()
  code = f'from moejax.data import locking; print(locking.acquire({path!r}, wait=False))'
  other = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert other.stdout.strip() == 'None', other.stderr  # another process cannot take it
  held.release()
  assert not os.path.exists(path)
  with locking.acquire(path):  # and once released, it can
    pass


SLOW = pytest.mark.slow
@pytest.mark.parametrize('signum,workers,group', [(signal.SIGTERM, 1, False), (signal.SIGTERM, 2, False),
                                                  pytest.param(signal.SIGTERM, 2, True, marks=SLOW),
                                                  pytest.param(signal.SIGINT, 1, True, marks=SLOW),
                                                  pytest.param(signal.SIGINT, 2, True, marks=SLOW)])
def test_interrupted_preparation_is_one_line_and_resumes(byte_store, corpus_glob, tmp_path, signum, workers, group):
  """SIGTERM to the driver (kill), to the whole group (scancel) and Ctrl-C (the group): one line, nothing left over."""
  out = tmp_path / 'store'
  proc = _start_slow(out, corpus_glob, f'--workers={workers}')
  _wait_for(lambda: glob.glob(str(out / 'chunks' / '*.json')))
  (os.killpg if group else os.kill)(proc.pid, signum)
  _, stderr = proc.communicate(timeout=90)
  assert proc.returncode == (143 if signum == signal.SIGTERM else 130), stderr
  line = _one_error_line(stderr)
  assert re.fullmatch(r'moejax: error: prepare (stopped by SIGTERM|interrupted \(Ctrl-C\)): \d+ of \d+ chunks of '
                      r'.* are done and kept: rerun the same command to resume', line), line
  assert _leftovers(out) == [] and not os.path.exists(out / 'manifest.json')
  _prepare(out, corpus_glob)  # resumes
  _same_store(byte_store, out)


def _workers_of(pid):
  """The pids of a process's spawned pool workers (not its resource tracker)."""
  found = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
      with open(f'/proc/{entry}/cmdline', 'rb') as f:
        command = f.read()
    except (OSError, ValueError, IndexError):
      continue
    if ppid == pid and b'spawn_main' in command:
      found.append(int(entry))
  return found


@pytest.mark.slow
def test_a_killed_worker_is_one_line_and_the_run_resumes(byte_store, corpus_glob, tmp_path):
  """SIGKILL (the OOM killer) of one worker: the run ends with one line instead of hanging, and resumes."""
  out = tmp_path / 'store'
  proc = _start_slow(out, corpus_glob, '--workers=2')
  _wait_for(lambda: glob.glob(str(out / 'chunks' / '*.json')) and _workers_of(proc.pid))
  os.kill(_workers_of(proc.pid)[0], signal.SIGKILL)
  _, stderr = proc.communicate(timeout=90)
  assert proc.returncode == 1, stderr
  assert 'a preparation worker process died' in _one_error_line(stderr)
  assert _leftovers(out) == []
  _prepare(out, corpus_glob)
  _same_store(byte_store, out)


def test_concurrent_preparations_share_the_chunks(byte_store, corpus_glob, tmp_path):
  """Two runs with the same settings at once: each chunk is made once, by one of them, and both end complete."""
  out = tmp_path / 'shared'
  procs = [_start_slow(out, corpus_glob, '--workers=1', plan_s='0.5') for _ in range(2)]
  outputs = [p.communicate(timeout=180) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  made = [int(m.group(1)) for _, err in outputs for m in re.finditer(r'prepared (\d+) chunk', err)]
  assert sum(made) == len(json.load(open(out / 'plan.json'))['chunks']), outputs
  _same_store(byte_store, out)


@pytest.mark.slow
def test_concurrent_preparations_with_other_settings_are_refused(corpus_glob, tmp_path):
  """Two runs with different settings started together: the second to plan waits, then is refused in one line."""
  out = tmp_path / 'contested'
  procs = [_start_slow(out, corpus_glob, '--workers=1', f'--heldout_bytes={n}', plan_s='1', chunk_s='0')
           for n in (4000, 5000)]
  outputs = [p.communicate(timeout=180) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 1], outputs
  line = _one_error_line(outputs[[p.returncode for p in procs].index(1)][1])
  assert re.search(r'holds a preparation with other settings: heldout_bytes \((4000 -> 5000|5000 -> 4000)\)', line)
  chunks.verify_store(str(out))


@pytest.mark.slow
def test_verify_refuses_a_store_mixed_from_two_preparations(trained, corpus_glob, tmp_path):
  """Chunk 2 from a BPE trained on other bytes, with a manifest that matches its shards (as two racing runs made)."""
  other = tmp_path / 'other'
  _prepare(other, corpus_glob, tokenizer='train:bpe:400', tokenizer_train_bytes=50_000)
  mixed = _damaged(trained['bpe_store'], tmp_path, 'mixed')
  for name in ('train/000002.bin', 'heldout/000002.bin', 'chunks/000002.json'):
    shutil.copyfile(other / name, mixed / name)
  manifest, record = json.load(open(mixed / 'manifest.json')), json.load(open(mixed / 'chunks' / '000002.json'))
  for split, entry in record['splits'].items():
    shards = manifest['splits'][split]['shards']
    shards[2] = {k: entry[k] for k in ('file', 'tokens', 'sha256')}
    manifest['splits'][split]['tokens'] = sum(e['tokens'] for e in shards)
  assert not filecmp.cmp(other / 'train' / '000002.bin', os.path.join(trained['bpe_store'], 'train', '000002.bin'))
  files.atomic_write_json(str(mixed / 'manifest.json'), manifest)
  out = _prepare_cli(f'--verify={mixed}')
  assert out.returncode == 1, out.stdout
  assert 'chunk 000002 was made by another preparation' in _one_error_line(out.stderr)
  _prepare(mixed, corpus_glob, tokenizer='train:bpe:400')  # the rerun re-makes that chunk
  _same_store(trained['bpe_store'], mixed)


def test_rerunning_prepare_repairs_a_damaged_store(byte_store, tmp_path):
  """The command training's error gives re-makes a missing and a corrupt shard: the store is as a clean run's."""
  out = _damaged(byte_store, tmp_path, 'repair')
  os.remove(out / 'train' / '000001.bin')
  with open(out / 'heldout' / '000000.bin', 'r+b') as f:
    f.seek(10)
    f.write(b'\x07\x00')
  with pytest.raises(DataError, match=r'train/000001.bin is missing: the store is damaged; rerun the command') as e:
    data.open_store(str(out), verify='size')
  command = shlex.split(str(e.value).split('re-makes missing and damaged shards: ')[1])
  assert command[:3] == ['python', '-m', 'moejax.prepare']
  fixed = _prepare_cli(*command[3:], '--workers=1')
  assert fixed.returncode == 0, fixed.stderr
  assert 're-making them' in fixed.stderr
  _same_store(byte_store, out)
  assert _prepare_cli(f'--verify={out}').returncode == 0


def test_out_of_vocabulary_tokens_stop_training_naming_the_shard(tiny_cfg, byte_store, tmp_path):
  """A shard damaged in place passes verify_store='size'; reading it names the shard instead of a NaN loss."""
  from moejax import main  # pylint: disable=import-outside-toplevel
  out = _damaged(byte_store, tmp_path, 'oov')
  for path in glob.glob(str(out / 'train' / '*.bin')):
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.write(b'\xff' * size)  # token 65535 everywhere, the same size
  cfg = config_lib.apply_overrides(tiny_cfg, {'data.source': f'store:{out}', 'data.verify_store': 'size',
                                              'train.steps': 2})
  with pytest.raises(DataError, match=r'token shard .*oov/train/0000\d\d.bin holds token 65535 >= the vocabulary 257'):
    main.execute(cfg, str(tmp_path / 'run'))
  assert tok_lib.load_snapshot(str(tmp_path / 'run')).kind == 'bytes'  # (the run kept its tokenizer first)


def test_store_source_takes_its_tokenizer_from_the_manifest(tiny_cfg, trained):
  cfg = config_lib.apply_overrides(tiny_cfg, {'data.source': f'store:{trained["bpe_store"]}', 'model.vocab_size': None})
  assert cfg.data.tokenizer == 'bytes'  # not given
  resolved = config_lib.validate(cfg)
  assert resolved.data.tokenizer == 'train:bpe:400' and resolved.model.vocab_size == 400
  other = config_lib.apply_overrides(tiny_cfg, {'data.source': f'store:{trained["bpe_store"]}',
                                                'data.tokenizer': f'sentencepiece:{trained["unigram"]}'})
  with pytest.raises(DataError, match=r'prepared with tokenizer train:bpe:400, but data.tokenizer=.*sentencepiece'):
    data.corpus_from_config(other.data)


@pytest.mark.slow
def test_run_keeps_its_tokenizer_when_the_store_moves(tiny_cfg, trained, tmp_path):
  store = shutil.copytree(trained['bpe_store'], tmp_path / 'store')
  d = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'data.source': f'store:{store}',
                                                                'model.vocab_size': None})).data
  corpus = data.corpus_from_config(d)
  workdir = str(tmp_path / 'run')
  overrides = tok_lib.snapshot(corpus.tokenizer, workdir)
  assert tok_lib.snapshot(corpus.tokenizer, workdir) == overrides  # (a second call writes nothing new)
  copy = tok_lib.load(overrides['data.tokenizer'], separator_token=overrides['data.separator_token'])
  assert (copy.hash, copy.separator) == (corpus.tokenizer.hash, corpus.tokenizer.separator)
  shutil.move(store, tmp_path / 'moved')
  data.open_store.cache_clear()
  with pytest.raises(DataError, match='does not exist'):
    data.corpus_from_config(d)
  kept = data.corpus_from_config(d, workdir)
  docs = [TEXT.encode()]
  np.testing.assert_array_equal(kept.tokenizer.encode_documents(docs)[0], corpus.tokenizer.encode_documents(docs)[0])
  with pytest.raises(DataError, match=r'store.*does not exist.*keeps only the tokenizer; scoring and training need'):
    kept.heldout_tokens.size  # pylint: disable=pointless-statement


def test_prepare_logs_the_training_bytes_used_and_a_smaller_vocabulary(corpus_glob, tmp_path, caplog):
  caplog.set_level('INFO', logger='moejax')
  used = sum(len(d) for _, d in data.read_documents(corpus_glob)) // 2
  _prepare(tmp_path / 'small', corpus_glob, tokenizer='train:bpe:60000', plan_only=True)
  messages = [r.getMessage() for r in caplog.records]
  vocab = json.load(open(tmp_path / 'small' / 'plan.json'))['tokenizer']['vocab_size']
  assert vocab < 60000 and any(f'learned only {vocab} tokens' in m for m in messages), messages
  trained_on = [int(m.group(1)) for m in map(re.compile(r'on (\d+) bytes of training documents').search, messages) if m]
  assert trained_on and used < trained_on[0] < 2 * used  # the training split, not the 200 MiB cap



def _fill(disk, leave: int) -> str:
  """Writes a ballast file that leaves `leave` bytes free on `disk`; returns its path."""
  free = os.statvfs(disk)
  path = str(disk / 'ballast')
  try:
    with open(path, 'wb') as f:
      f.write(b'\0' * max(free.f_bavail * free.f_frsize - leave, 0))
  except OSError:
    pass
  return path


@pytest.mark.parametrize('workers', [1, pytest.param(2, marks=pytest.mark.slow)])
def test_full_disk_during_prepare_is_one_line_and_resumes(byte_store, corpus_glob, small_disk, workers):
  out = small_disk / 'store'
  ballast = _fill(small_disk, 160 << 10)  # the plan fits, not every chunk
  run = _prepare_cli(f'--source={corpus_glob}', f'--out={out}', '--heldout_bytes=4000', '--chunk_bytes=20000',
                     f'--workers={workers}', '--quiet')
  assert run.returncode == 1, run.stderr
  line = _one_error_line(run.stderr)
  assert re.fullmatch(r'moejax: error: writing the token store .* failed: No space left on device.*; \d+ of \d+ '
                      r'chunks of .* are done and kept: rerun the same command to resume', line), line
  assert _leftovers(out) == [] and not os.path.exists(out / 'manifest.json')
  os.remove(ballast)
  _prepare(out, corpus_glob)  # resumes
  _same_store(byte_store, out)


@pytest.mark.slow
def test_full_disk_while_planning_leaves_no_directory(corpus_glob, small_disk):
  _fill(small_disk, 0)
  run = _prepare_cli(f'--source={corpus_glob}', f'--out={small_disk}/store', '--heldout_bytes=4000',
                     '--tokenizer=train:bpe:400', '--quiet')
  assert run.returncode == 1, run.stderr
  assert 'No space left on device' in _one_error_line(run.stderr)
  assert sorted(os.listdir(small_disk)) == ['ballast']
