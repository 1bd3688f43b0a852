"""Tokenizers: bytes, SentencePiece model files, HuggingFace `tokenizer.json`, and training one.

Config `data.tokenizer`:
  'bytes'                    bytes 0..255 and the document separator 256 (vocabulary 257);
  'sentencepiece:PATH'       a SentencePiece `.model` file;
  'hf:PATH'                  a HuggingFace `tokenizers` `tokenizer.json`;
  'train:bpe:N'              a byte-level BPE of N tokens (HF `tokenizers`), trained on the
                             training split of `data.source` (deterministic);
  'train:unigram:N'          a SentencePiece unigram model of N tokens, trained the same way.

Every document starts with the tokenizer's separator token: 256 for bytes, `<|doc|>` for a
trained BPE, `<s>` for a trained unigram, and for a file the token named by
`data.separator_token` (default: the first of SEPARATOR_NAMES the file has, else its BOS).

Trained tokenizers round-trip every valid UTF-8 text exactly (byte-level BPE; unigram with
identity normalization and byte fallback). A document that is not valid UTF-8 is decoded
with U+FFFD replacement before a subword tokenizer sees it (bytes sees the raw bytes).

A tokenizer's identity is the sha256 of its file (`hash`); bytes has the hash 'bytes'.

A run keeps its own copy of its tokenizer (`snapshot`, WORKDIR/tokenizer/), so sampling and
exporting a run do not depend on the store or file it was trained with (`load_snapshot`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
from typing import Iterable, Sequence

import numpy as np

from moejax import files
from moejax.errors import DataError

BYTES_VOCAB = 257
BYTES_SEPARATOR = 256
TRAINED_BPE_SEPARATOR = '<|doc|>'
SEPARATOR_NAMES = ('<|endoftext|>', '<|doc|>', '<|begin_of_text|>', '<s>', '<bos>', '<|end_of_text|>', '</s>', '<eos>')
TRAIN_KINDS = {'bpe': 'tokenizer.json', 'unigram': 'tokenizer.model'}
MIN_TRAINED_VOCAB = 300  # above the 256 byte symbols and the specials
SNAPSHOT_DIR = 'tokenizer'  # a run's copy: WORKDIR/tokenizer/{tokenizer.json|tokenizer.model, moejax_tokenizer.json}
SNAPSHOT_INFO = 'moejax_tokenizer.json'


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed `data.tokenizer` value."""
  kind: str  # 'bytes' | 'sentencepiece' | 'hf' | 'train'
  path: str | None = None  # file kinds
  train_kind: str | None = None  # 'bpe' | 'unigram'
  vocab_size: int | None = None  # train kinds

  @property
  def is_file(self) -> bool:
    return self.kind in ('sentencepiece', 'hf')


def parse_spec(text: str) -> Spec:
  """'bytes' | 'sentencepiece:PATH' | 'hf:PATH' | 'train:bpe:N' | 'train:unigram:N' -> Spec (ValueError if not)."""
  if text == 'bytes':
    return Spec('bytes')
  kind, sep, rest = str(text).partition(':')
  if sep and kind in ('sentencepiece', 'hf') and rest:
    return Spec(kind, path=os.path.expanduser(rest))
  if sep and kind == 'train':
    train_kind, _, size = rest.partition(':')
    if train_kind in TRAIN_KINDS and size.isdigit() and int(size) >= MIN_TRAINED_VOCAB:
      return Spec('train', train_kind=train_kind, vocab_size=int(size))
  raise ValueError(f"data.tokenizer={text!r} must be 'bytes', 'sentencepiece:PATH', 'hf:PATH', 'train:bpe:N' or "
                   f"'train:unigram:N' (N >= {MIN_TRAINED_VOCAB})")


def file_hash(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def as_text(data: bytes) -> str:
  """A document's text for a subword tokenizer (invalid UTF-8 replaced by U+FFFD)."""
  return data.decode('utf-8', errors='replace')


class Tokenizer:
  """encode(list of document bytes) -> token arrays, decode(ids) -> bytes; `vocab_size`, `separator`, `hash`."""

  kind: str
  vocab_size: int
  separator: int
  hash: str
  path: str | None = None

  def encode_documents(self, docs: Sequence[bytes]) -> list[np.ndarray]:
    """Each document as an integer array [separator, tokens...] (uint16 for bytes, int64 otherwise)."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> bytes:
    """The UTF-8 bytes of `ids` (separators excluded by the caller)."""
    raise NotImplementedError

  def separator_name(self) -> str | None:
    """The separator token's text (None for bytes)."""
    return None

  def describe(self) -> dict:
    return {'kind': self.kind, 'vocab_size': self.vocab_size, 'separator': self.separator, 'hash': self.hash,
            **({'file': os.path.basename(self.path)} if self.path else {})}


class ByteTokenizer(Tokenizer):
  kind, vocab_size, separator, hash = 'bytes', BYTES_VOCAB, BYTES_SEPARATOR, 'bytes'

  def encode_documents(self, docs):
    sep = np.array([BYTES_SEPARATOR], np.uint16)  # (uint16: packing the stdlib in int64 would take 4x the memory)
    return [np.concatenate([sep, np.frombuffer(d, np.uint8)]) for d in docs]

  def decode(self, ids):
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes()


class HFTokenizer(Tokenizer):
  """A HuggingFace `tokenizers` file."""
  kind = 'hf'

  def __init__(self, path: str, separator_token: str | None = None):
    from tokenizers import Tokenizer as _HF  # pylint: disable=import-outside-toplevel
    self.path, self.hash = path, _hash_or_fail(path)
    try:
      self._tok = _HF.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (the library raises a bare Exception)
      raise DataError(f'tokenizer file {path} does not load as a HuggingFace tokenizer.json: '
                      f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    self._tok.no_padding()
    self._tok.no_truncation()
    # A special token's text inside a document ('<|endoftext|>' quoted in a web page) is text: encoded as such, it
    # never becomes the separator id, which would open a false document (data.document_mask restarts positions).
    self._tok.encode_special_tokens = True
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    names = [separator_token] if separator_token else list(SEPARATOR_NAMES)
    found = [self._tok.token_to_id(n) for n in names if self._tok.token_to_id(n) is not None]
    if not found:
      raise DataError(f'tokenizer file {path} has no separator token ' +
                      (f'{separator_token!r}' if separator_token else f'(none of {", ".join(SEPARATOR_NAMES)})') +
                      '; set data.separator_token to one of its special tokens')
    self.separator = int(found[0])

  def encode_documents(self, docs):
    encoded = self._tok.encode_batch([as_text(d) for d in docs], add_special_tokens=False)
    return [np.concatenate([[self.separator], e.ids]).astype(np.int64) for e in encoded]

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False).encode('utf-8')

  def separator_name(self):
    return self._tok.id_to_token(self.separator)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file."""
  kind = 'sentencepiece'

  def __init__(self, path: str, separator_token: str | None = None):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.path, self.hash = path, _hash_or_fail(path)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise DataError(f'tokenizer file {path} does not load as a SentencePiece model: '
                      f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    self.vocab_size = int(self._sp.vocab_size())
    if separator_token:
      sep = self._sp.piece_to_id(separator_token)
      if sep == self._sp.unk_id() and separator_token != self._sp.id_to_piece(sep):
        raise DataError(f'tokenizer file {path} has no token {separator_token!r} (data.separator_token)')
    else:
      sep = self._sp.bos_id() if self._sp.bos_id() >= 0 else self._sp.eos_id()
      if sep < 0:
        raise DataError(f'tokenizer file {path} has neither a BOS nor an EOS token; set data.separator_token')
    self.separator = int(sep)

  def encode_documents(self, docs):
    threads = int(os.environ.get('RAYON_NUM_THREADS', '-1'))  # one per preparation worker (see preparation.py)
    encoded = self._sp.encode([as_text(d) for d in docs], num_threads=threads)
    return [np.concatenate([[self.separator], e]).astype(np.int64) for e in encoded]

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids]).encode('utf-8')

  def separator_name(self):
    return self._sp.id_to_piece(self.separator)


def _hash_or_fail(path: str) -> str:
  if not os.path.isfile(path):
    raise DataError(f'tokenizer file {path} does not exist')
  try:
    return file_hash(path)
  except OSError as e:
    raise DataError(f'tokenizer file {path} cannot be read: {e.strerror or e}') from None


def load(spec: str | Spec, trained_path: str | None = None, separator_token: str | None = None) -> Tokenizer:
  """The tokenizer of `spec`; a 'train:' spec loads the trained file at `trained_path`."""
  spec = parse_spec(spec) if isinstance(spec, str) else spec
  if spec.kind == 'bytes':
    return ByteTokenizer()
  if spec.kind == 'train':
    if trained_path is None:
      raise DataError(f'tokenizer train:{spec.train_kind}:{spec.vocab_size} has not been trained yet')
    kind, path, separator_token = ('hf', trained_path, TRAINED_BPE_SEPARATOR) if spec.train_kind == 'bpe' else (
        'sentencepiece', trained_path, None)
  else:
    kind, path = spec.kind, spec.path
  return (HFTokenizer if kind == 'hf' else SentencePieceTokenizer)(path, separator_token)


def train(spec: Spec, texts: Iterable[bytes], out_path: str) -> None:
  """Trains `spec` (a 'train:' spec) on documents `texts` and writes the model file to `out_path` (atomically).

  Deterministic: the same documents give a byte-identical file (BPE: HF `tokenizers`;
  unigram: SentencePiece, whose trainer is deterministic where HF's unigram trainer is not).
  """
  if spec.train_kind == 'bpe':
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=[TRAINED_BPE_SEPARATOR],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((as_text(t) for t in texts), trainer)
    with files.atomic_path(out_path) as tmp:
      try:
        tok.save(tmp)
      except Exception as e:  # pylint: disable=broad-except  (the library raises a bare Exception, e.g. on a full disk)
        raise OSError(f'cannot write {out_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    return
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  def lines():
    for t in texts:
      for line in as_text(t).split('\n'):
        if line:
          yield line

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=spec.vocab_size, model_type='unigram',
        normalization_rule_name='identity', add_dummy_prefix=False, remove_extra_whitespaces=False,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=-1, pad_id=-1,
        user_defined_symbols=['\n'], allow_whitespace_only_pieces=True, split_by_whitespace=True,
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise DataError(f'training tokenizer train:unigram:{spec.vocab_size} failed: {str(e).splitlines()[0]}') from None
  files.atomic_write(out_path, model.getvalue())


def _snapshot_overrides(folder: str, info: dict) -> dict:
  if info['kind'] == 'bytes':
    return {'data.tokenizer': 'bytes'}
  return {'data.tokenizer': f'{info["kind"]}:{os.path.join(folder, info["file"])}',
          'data.separator_token': info['separator_token']}


def snapshot(tokenizer: Tokenizer, workdir: str) -> dict:
  """Keeps a copy of `tokenizer` in WORKDIR/tokenizer/ (atomic writes; nothing written if it is there already).

  Returns the config overrides (`data.tokenizer`, `data.separator_token`) that load the copy.
  """
  folder = os.path.join(workdir, SNAPSHOT_DIR)
  info = {'kind': tokenizer.kind, 'vocab_size': tokenizer.vocab_size, 'separator': tokenizer.separator,
          'hash': tokenizer.hash, 'separator_token': tokenizer.separator_name(),
          'file': {'hf': 'tokenizer.json', 'sentencepiece': 'tokenizer.model'}.get(tokenizer.kind)}
  info_path = os.path.join(folder, SNAPSHOT_INFO)
  try:
    if _read_snapshot_info(info_path) != info:
      os.makedirs(folder, exist_ok=True)
      if info['file']:
        with files.atomic_path(os.path.join(folder, info['file'])) as tmp:
          shutil.copyfile(tokenizer.path, tmp)
      files.atomic_write_json(info_path, info)
  except OSError as e:
    raise DataError(f'cannot keep a copy of the tokenizer in {folder}: {e.strerror or e}') from None
  return _snapshot_overrides(folder, info)


def _read_snapshot_info(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  return files.read_json(path, 'tokenizer copy description')


def load_snapshot(workdir: str) -> Tokenizer | None:
  """The tokenizer copy a run keeps in WORKDIR/tokenizer/ (`snapshot`), or None if it keeps none."""
  folder = os.path.join(workdir, SNAPSHOT_DIR)
  info = _read_snapshot_info(os.path.join(folder, SNAPSHOT_INFO))
  if info is None:
    return None
  if info['kind'] == 'bytes':
    return ByteTokenizer()
  tokenizer = load(Spec(info['kind'], path=os.path.join(folder, info['file'])), separator_token=info['separator_token'])
  if tokenizer.hash != info['hash'] or tokenizer.separator != info['separator']:
    raise DataError(f'the tokenizer copy in {folder} does not match its description {SNAPSHOT_INFO} (damaged)')
  return tokenizer


def vocab_size_without_io(spec_text: str) -> int | None:
  """The vocabulary of a spec when it is known without reading a file (bytes, train:), else None."""
  spec = parse_spec(spec_text)
  return BYTES_VOCAB if spec.kind == 'bytes' else spec.vocab_size if spec.kind == 'train' else None


def dtype_for(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
