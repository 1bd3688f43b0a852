"""HuggingFace interop (docs/interop.md): layouts, the weight table, safetensors shards, export and import.

  layouts.py    which design each HF layout expresses; config.json both ways (transformers 4.x and 5.x)
  weights.py    moejax parameter <-> HF tensor names and shapes, one table for both directions
  shards.py     safetensors files and HF's sharded index, through the `safetensors` package
  staging.py    the output directory: written beside its target and renamed, or removed
  exporter.py   a run's latest checkpoint -> a HF checkpoint (`python -m moejax.export`)
  importer.py   a HF checkpoint -> a moejax workdir (`python -m moejax.import_hf`)
"""
