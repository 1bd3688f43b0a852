"""The data layer: sources, corpora (split and packing) and grain pipelines.

| module | owns |
|---|---|
| `sources.py` | reading (key, bytes) documents from `stdlib`, `text:GLOB`, `tfds:NAME`; the binary-file screen |
| `corpus.py` | `Corpus`, the fingerprint, the capped document-level held-out split, packing, `load_corpus` |
| `pipeline.py` | training windows (seeded shuffle, per-process rows, checkpointable state) and held-out batches |

Everything a caller needs is importable from `moejax.data` itself.
"""

from moejax.data.corpus import (SEPARATOR, Corpus, corpus_from_config, fingerprint, load_corpus, pack,
                                split_documents)
from moejax.data.pipeline import Windows, heldout_batches, train_dataset
from moejax.data.sources import BINARY_SHARE, looks_binary, non_text_share, read_documents, stdlib_files

__all__ = ['SEPARATOR', 'Corpus', 'corpus_from_config', 'fingerprint', 'load_corpus', 'pack', 'split_documents',
           'Windows', 'heldout_batches', 'train_dataset', 'BINARY_SHARE', 'looks_binary', 'non_text_share',
           'read_documents', 'stdlib_files']
