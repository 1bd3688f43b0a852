"""Benchmarks that print ratios measured side by side in one process (never asserted in tests).

One module per benchmark, each with its own flags, runnable as `python -m moejax.bench.<name>`
or `python -m moejax.bench <name>`:

  step    the train step of every point of an experiment's sweep (`moejax.bench.step`)
  moe     grouped matmul and MoE layer per shape, with a Triton settings sweep (`moejax.bench.moe`)
  data    the data path: store pipeline, preparation rate, memory (`moejax.bench.data`)
  decode  KV-cache decoding against the bandwidth model (`moejax.bench.decode`)

Each returns rows from a `run` function; `tables` renders every Markdown table.
"""
