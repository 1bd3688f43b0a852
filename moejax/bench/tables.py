"""Markdown for every benchmark: the one place rows (lists of dicts) become tables.

The benchmark functions (`step.run`, `moe.run`, `data.run`, `decode.run`) return rows; their
entry points print what this module renders, and tests assert on the rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from moejax.model import accounting

# (header, right-aligned, cell(row) -> str)
Column = tuple[str, bool, Callable[[dict], str]]


def fmt(value: Any, spec: str) -> str:
  """format(value, spec), or '-' for None."""
  return '-' if value is None else format(value, spec)


def _times(value: float | None, spec: str) -> str:
  """'1.23x', or '-' for None (a measurement that failed; the benchmark's stderr says why)."""
  return '-' if value is None else format(value, spec) + 'x'


def table(columns: Sequence[Column], rows: Sequence[dict]) -> list[str]:
  """A Markdown table: header, alignment row, one line per row."""
  lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |',
           '|' + '|'.join('---:' if c[1] else '---' for c in columns) + '|']
  return lines + ['| ' + ' | '.join(c[2](r) for c in columns) + ' |' for r in rows]


def step_table(rows: Sequence[dict]) -> list[str]:
  """`bench step`: one line per sweep point."""
  return table([
      ('name', False, lambda r: r['name']),
      ('mesh', False, lambda r: r['mesh']),
      ('N_total', True, lambda r: accounting.human(r['n_total'])),
      ('N_active', True, lambda r: accounting.human(r['n_active'])),
      ('step ms', True, lambda r: f'{r["step_ms"]:.1f}'),
      ('tok/s', True, lambda r: f'{r["tokens_per_s"]:,.0f}'),
      ('MFU', True, lambda r: fmt(r['mfu'], '.1%')),
      ('ratio to first', True, lambda r: f'{r["ratio"]:.2f}x'),
      ('EP dropped', True, lambda r: fmt(r['ep_dropped'], '.1%')),
      ('compile+warmup s', True, lambda r: f'{r["compile_s"]:.1f}'),
  ], rows)


def _shape(r: dict) -> str:
  E, D, F, M = r['shape']
  return f'E{E} D{D} F{F} M{M}'


def gmm_table(rows: Sequence[dict]) -> list[str]:
  """`bench moe`: grouped-matmul throughput per op and routing."""
  return table([
      ('shape', False, _shape),
      ('op', False, lambda r: r['op']),
      ('routing', False, lambda r: r['routing']),
      ('fwd TFLOP/s', True, lambda r: fmt(r['fwd_tflops'], '.2f')),
      ('fwd+bwd TFLOP/s', True, lambda r: fmt(r['both_tflops'], '.2f')),
      ('fwd vs einsum', True, lambda r: _times(r['fwd_vs_einsum'], '.2f')),
      ('fwd+bwd vs einsum', True, lambda r: _times(r['both_vs_einsum'], '.2f')),
  ], rows)


def sweep_table(rows: Sequence[dict]) -> list[str]:
  """`bench moe --triton=...`: the Pallas grouped matmul per (block, tile, warps, stages), balanced groups."""
  return table([
      ('shape', False, _shape),
      ('block', True, lambda r: str(r['block'])),
      ('tile', True, lambda r: str(r['tile'])),
      ('warps', True, lambda r: str(r['num_warps'])),
      ('stages', True, lambda r: str(r['num_stages'])),
      ('kernel', False, lambda r: r['kernel']),
      ('fwd TFLOP/s', True, lambda r: fmt(r['fwd_tflops'], '.2f')),
      ('fwd+bwd TFLOP/s', True, lambda r: fmt(r['both_tflops'], '.2f')),
      ('fwd vs einsum', True, lambda r: _times(r['fwd_vs_einsum'], '.2f')),
      ('fwd+bwd vs einsum', True, lambda r: _times(r['both_vs_einsum'], '.2f')),
      ('fwd+bwd vs ragged_dot', True, lambda r: _times(r['both_vs_ragged'], '.1f')),
  ], rows)


def layer_table(rows: Sequence[dict]) -> list[str]:
  """`bench moe`: the whole MoE layer forward+backward against a dense SwiGLU of equal active FLOPs."""
  return table([
      ('shape', False, _shape),
      ('layer', False, lambda r: r['layer']),
      ('kernels', False, lambda r: r['kernels']),
      ('ms', True, lambda r: fmt(r['ms'], '.2f')),
      ('vs dense MLP of equal active FLOPs', True, lambda r: _times(r['vs_dense'], '.2f')),
      ('router + top-k share', True, lambda r: fmt(r['router_share'], '.0%')),
  ], rows)


def decode_table(rows: Sequence[dict]) -> list[str]:
  """`bench decode`: measured step time against the bandwidth model."""
  return table([
      ('model', False, lambda r: r['name']),
      ('B', True, lambda r: str(r['batch'])),
      ('ctx', True, lambda r: str(r['context'])),
      ('dispatch', False, lambda r: r['dispatch']),
      ('prefill ms', True, lambda r: f'{r["prefill_ms"]:.2f}'),
      ('ms/step', True, lambda r: f'{r["step_ms"]:.3f}'),
      ('tok/s', True, lambda r: f'{r["tokens_per_s"]:,.0f}'),
      ('distinct experts/layer (measured / uniform / from loads)', False,
       lambda r: f'{fmt(r["distinct"], ".1f")} / {fmt(r["distinct_uniform"], ".1f")} / '
                 f'{fmt(r["distinct_from_loads"], ".1f")}'),
      ('weight MB/step', True, lambda r: f'{r["weight_bytes"] / 1e6:.2f}'),
      ('KV MB/step', True, lambda r: f'{r["kv_bytes"] / 1e6:.2f}'),
      ('achieved GB/s', True, lambda r: f'{r["achieved_bytes_per_s"] / 1e9:.2f}'),
      ('model ms', True, lambda r: f'{r["model_ms"]:.3f}'),
      ('measured/model', True, lambda r: f'{r["ratio"]:.1f}x'),
  ], rows)


def decode_breakdown_table(rows: Sequence[dict]) -> list[str]:
  """`bench decode`: where the step time goes (the same step, ablated)."""
  return table([
      ('model', False, lambda r: r['name']),
      ('B', True, lambda r: str(r['batch'])),
      ('floor ms (dispatch, no work)', True, lambda r: f'{r["floor_ms"]:.3f}'),
      ('no-FFN step ms', True, lambda r: f'{r["no_ffn_ms"]:.3f}'),
      ('full step ms', True, lambda r: f'{r["step_ms"]:.3f}'),
      ('FFN ms (full - no FFN)', True, lambda r: fmt(r['ffn_ms'], '.3f')),
      ('compiled top-level ops', True, lambda r: str(r['ops'])),
      ('bytes at bandwidth ms', True, lambda r: f'{r["model_ms"]:.3f}'),
      ('FLOPs at matmul rate ms', True, lambda r: f'{r["compute_ms"]:.3f}'),
      ('measured distinct / uniform', True,
       lambda r: '-' if not r['distinct'] else f'{r["distinct"] / r["distinct_uniform"]:.2f}'),
  ], rows)


def data_pipeline_table(rows: Sequence[dict]) -> list[str]:
  """`bench data` (1): the store pipeline's delivered tokens/s against an H100's consumption."""
  return table([
      ('batch', False, lambda r: f'{r["batch"]} x {r["seq_len"]}'),
      ('delivered tokens/s (1 process)', True, lambda r: f'{r["delivered"]:,.0f}'),
      ('H100 @ 40% MFU tokens/s', True, lambda r: f'{r["consumed"]:,.0f}'),
      ('ratio', True, lambda r: f'{r["delivered"] / r["consumed"]:.0f}x'),
  ], rows)


def prepare_table(rows: Sequence[dict]) -> list[str]:
  """`bench data` (2): `moejax.prepare` tokens/s per tokenizer and worker count."""
  return table([
      ('tokenizer', False, lambda r: r['tokenizer']),
      ('workers', True, lambda r: str(r['workers'])),
      ('tokens', True, lambda r: f'{r["tokens"]:,}'),
      ('tokens/s', True, lambda r: f'{r["rate"]:,.0f}'),
      ('tokens/s per worker', True, lambda r: f'{r["rate"] / r["workers"]:,.0f}'),
      ('speed-up', True, lambda r: f'{r["speedup"]:.2f}x'),
  ], rows)


def memory_table(rows: Sequence[dict]) -> list[str]:
  """`bench data` (3): peak RSS of a short training run per corpus."""
  return table([
      ('corpus', False, lambda r: r['corpus']),
      ('corpus size', True, lambda r: f'{r["gb"]:.2f} GB'),
      ('peak RSS', True, lambda r: f'{r["peak_mb"]:,.0f} MB'),
  ], rows)


def attention_table(rows: list[dict]) -> list[str]:
  """`bench attention`'s rows as a Markdown table."""
  lines = ['| L | core | temporaries | ratio to xla | [H, L, L] float32 scores | compile s |',
           '|---:|---|---:|---:|---:|---:|']
  for r in rows:
    ratio = '-' if r['ratio_to_xla'] is None else f'{r["ratio_to_xla"]:.3f}'
    lines.append(f'| {r["L"]} | {r["core"]} | {r["temp_bytes"] / 2**20:,.1f} MiB | {ratio} | '
                 f'{r["scores_bytes"] / 2**20:,.0f} MiB | {r["compile_s"]:.1f} |')
  return lines
