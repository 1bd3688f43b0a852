"""The data layer: sources, tokenizers, the on-disk token store, corpora and grain pipelines.

| module | owns |
|---|---|
| `sources.py` | reading (key, bytes) documents from `stdlib`, `text:`, `jsonl:`, `parquet:`, `tfds:`, positionally; the binary-file screen |
| `tokenizers.py` | the `bytes`, SentencePiece and HuggingFace tokenizers, training BPE/unigram ones, spec parsing, a run's tokenizer copy |
| `store.py` | the token-store format: manifest, shard verification, `TokenStream` (positional reads across shards) |
| `preparation.py` | building a store: plan, parallel/sharded chunk tokenization, resume, finalize, verify, repair (`moejax.prepare`) |
| `locking.py` | the flock locks that give a store and each of its chunks one owner at a time |
| `chunk_pool.py` | running chunk jobs in worker processes and stopping them cleanly (signals, a dead worker) |
| `corpus.py` | `Corpus`, the fingerprint, the held-out split of in-memory corpora, `corpus_from_config`, vocabulary checks |
| `pipeline.py` | training windows (seeded shuffle, per-process rows, checkpointable state, prefetch), held-out batches, exact bits-per-byte bytes |

Everything a caller needs is importable from `moejax.data` itself. Importing it is cheap:
grain, `tokenizers` and `sentencepiece` load only when used.
"""

from moejax.data.corpus import (SEPARATOR, Corpus, check_vocab, corpus_from_config, fingerprint, load_corpus,
                                open_store, pack, split_documents, store_tokenizer_spec, vocab_size)
from moejax.data.pipeline import Windows, heldout_batches, scored_bytes, train_dataset
from moejax.data.sources import (BINARY_DOCUMENTS, BINARY_SHARE, SourceOptions, looks_binary, non_text_share,
                                 read_documents, stdlib_files)

__all__ = ['SEPARATOR', 'Corpus', 'check_vocab', 'corpus_from_config', 'fingerprint', 'load_corpus', 'open_store',
           'pack', 'split_documents', 'store_tokenizer_spec', 'vocab_size', 'Windows', 'heldout_batches',
           'scored_bytes', 'train_dataset',
           'BINARY_DOCUMENTS', 'BINARY_SHARE', 'SourceOptions', 'looks_binary', 'non_text_share', 'read_documents',
           'stdlib_files']
