"""Corpora, the document split, packing, and the checkpointable iterator."""

import hashlib
import os

import numpy as np
import pytest

from moejax import data
from moejax.errors import DataError


def test_split_is_deterministic_and_disjoint():
  docs = [(f'd{i}', bytes([65 + i % 26]) * (100 + i)) for i in range(50)]
  train, held = data.split_documents(docs, 1000)
  train2, held2 = data.split_documents(list(reversed(docs)), 1000)
  assert {k for k, _ in held} == {k for k, _ in held2}
  assert not {k for k, _ in train} & {k for k, _ in held}
  assert len(train) + len(held) == len(docs)
  assert 1000 - 150 < sum(len(d) for _, d in held) <= 1000  # a cap, filled to within one document


def test_one_large_document_never_becomes_the_heldout_split():
  docs = [(f'd{i}', b'x' * 100) for i in range(100)]
  big = next(f'big{i}' for i in range(1000) if hashlib.sha256(f'big{i}'.encode()).hexdigest() <
             min(hashlib.sha256(k.encode()).hexdigest() for k, _ in docs))  # ranks first
  docs.append((big, b'y' * 2_000_000))
  train, held = data.split_documents(docs, 5000, max_fraction=0.1)
  assert big not in {k for k, _ in held} and sum(len(d) for _, d in held) == 5000
  # The share cap binds when data.heldout_bytes is more than 10% of a small corpus.
  _, held = data.split_documents(docs[:100], 5000, max_fraction=0.1)
  assert sum(len(d) for _, d in held) == 1000


def test_heldout_cap_warns_when_the_share_binds(tmp_path, caplog):
  for i in range(20):
    (tmp_path / f'{i}.txt').write_bytes(b'word ' * 200)
  corpus = data.load_corpus(f'text:{tmp_path}/*.txt', 10_000, heldout_max_fraction=0.1)
  assert corpus.num_heldout_docs == 2 and corpus.num_train_docs == 18
  assert any('more than data.heldout_max_fraction=0.1' in r.getMessage() for r in caplog.records)


def test_binary_documents_are_refused_skipped_or_kept(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(10):
    (tmp_path / f'{i}.txt').write_text('def f(x):\n  return x  # ünïcode is text\n' * 20)
  (tmp_path / 'blob.txt').write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
  source = f'text:{tmp_path}/*.txt'
  with pytest.raises(DataError, match=r"document '.*blob.txt' looks binary"):
    data.load_corpus(source, 1000)
  assert data.load_corpus(source, 1000, heldout_max_fraction=0.5, binary_documents='skip').num_train_docs == 9
  kept = data.load_corpus(source, 1000, heldout_max_fraction=0.5, binary_documents='keep')
  assert kept.num_train_docs + kept.num_heldout_docs == 11
  assert not data.looks_binary('latin-1 is mostly text: caf\xe9 na\xefve'.encode('latin-1'))
  assert not data.looks_binary('# -*- coding: koi8-r -*-\nпривет = 1\n'.encode('koi8_r'))  # the stdlib ships such files
  assert data.looks_binary(b'text with a NUL\0 byte')


def test_unreadable_corpus_file_is_one_error_naming_it(tmp_path, monkeypatch):
  (tmp_path / 'a.txt').write_text('fine')
  (tmp_path / 'b.txt').write_text('locked')
  real_open = open

  def guarded(path, *args, **kwargs):  # (chmod cannot stop root, who runs CI)
    if str(path).endswith('b.txt'):
      raise PermissionError(13, 'Permission denied', str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr('builtins.open', guarded)
  with pytest.raises(DataError, match=r'corpus file .*b.txt cannot be read: Permission denied'):
    data.read_documents(f'text:{tmp_path}/*.txt')


def test_fingerprint_changes_with_content_and_names():
  docs = [('a', b'xy'), ('b', b'z')]
  assert data.fingerprint(docs) == data.fingerprint(list(docs))
  assert data.fingerprint(docs) != data.fingerprint([('a', b'xy'), ('b', b'q')])
  assert data.fingerprint(docs) != data.fingerprint([('a', b'x'), ('b', b'yz')])


def test_pack_inserts_separators():
  stream = data.pack([('a', b'AB'), ('b', b'C')])
  np.testing.assert_array_equal(stream, [256, 65, 66, 256, 67])


def test_stdlib_source_has_python_files():
  root, rels = data.stdlib_files()
  assert 'os.py' in rels and not any('site-packages' in r for r in rels)
  assert rels == sorted(rels)
  assert os.path.isfile(os.path.join(root, rels[0]))


def test_text_source_missing_and_empty(tmp_path):
  with pytest.raises(DataError, match='matches no files'):
    data.read_documents(f'text:{tmp_path}/nothing/*.txt')
  (tmp_path / 'empty.txt').write_bytes(b'')
  with pytest.raises(DataError, match='no non-empty documents'):
    data.read_documents(f'text:{tmp_path}/*.txt')


def test_heldout_taking_everything_is_an_error(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'hello world')
  with pytest.raises(DataError, match='none left to train on'):
    data.load_corpus(f'text:{tmp_path}/*.txt', 10_000)


def test_heldout_batches_cover_every_target_once():
  corpus = data.Corpus('x', 'f', np.arange(10, dtype=np.uint16), np.arange(23, dtype=np.uint16), 1, 1)
  batches = list(data.heldout_batches(corpus, seq_len=5, batch_size=2))
  targets = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(targets), np.arange(1, 23))
  for b in batches:  # targets are inputs shifted by one
    w = b['weights'] > 0
    np.testing.assert_array_equal(b['targets'][w], (b['inputs'] + 1)[w])


def test_train_iterator_resumes_from_state(corpus_glob):
  corpus = data.load_corpus(corpus_glob, 4000)
  ds = data.train_dataset(corpus, 16, 4, seed=3)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2), e)
  assert expected[0].shape == (4, 17) and expected[0].dtype == np.int32


def test_train_order_depends_only_on_data_seed(corpus_glob):
  corpus = data.load_corpus(corpus_glob, 4000)
  first = lambda seed: next(iter(data.train_dataset(corpus, 16, 4, seed=seed)))
  np.testing.assert_array_equal(first(0), first(0))
  assert not np.array_equal(first(0), first(1))


def test_too_few_windows_is_an_error():
  corpus = data.Corpus('x', 'f', np.arange(20, dtype=np.uint16), np.arange(5, dtype=np.uint16), 1, 1)
  with pytest.raises(DataError, match='train.batch_size=8'):
    data.train_dataset(corpus, 16, 8, seed=0)


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    docs = data.read_documents('tfds:lm1b', tfds_split='train', tfds_text_key='text')
  assert len(docs) == 12 and all(isinstance(d, bytes) and d for _, d in docs)
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(DataError, match='not a feature'):
      data.read_documents('tfds:lm1b', tfds_text_key='body')


def test_process_shares_make_up_the_global_batch_and_resume(corpus_glob):
  """Rows [start, stop) of every global batch, for any split into processes; iterator state resumes a share."""
  corpus = data.load_corpus(corpus_glob, 4000)
  whole = iter(data.train_dataset(corpus, 16, 8, seed=5))
  shares = [iter(data.train_dataset(corpus, 16, 8, seed=5, rows=r)) for r in ((0, 2), (2, 6), (6, 8))]
  for _ in range(4):
    np.testing.assert_array_equal(np.concatenate([next(s) for s in shares]), next(whole))
  state = shares[1].get_state()
  expected = next(shares[1])
  again = iter(data.train_dataset(corpus, 16, 8, seed=5, rows=(2, 6)))
  again.set_state(state)
  np.testing.assert_array_equal(next(again), expected)
  assert expected.shape == (4, 17)
