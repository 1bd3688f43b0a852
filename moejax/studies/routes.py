"""Routing analysis: replay a run's routing on a fixed held-out slice at every kept checkpoint (docs/studies.md).

For each workdir (seeds of one configuration), each kept checkpoint (`checkpoint.keep_every_steps`)
and each MoE layer, the routing of the same held-out tokens gives:
- specialisation: mutual information (bits) between the expert and the token id, and between
  the expert and the source document. The joint distribution is over assignments: each token
  spreads weight 1 evenly over the experts it uses (k for token choice). So a router that is a
  function of the token id has MI(expert; token) = H(expert) - log2 k exactly (and H(token)
  when k = 1 and the map is one-to-one); an independent router has MI 0 up to the plug-in
  estimator's upward bias, which the same MI with the labels shuffled estimates ('..._shuffled').
- stability: the mean share of each token's expert set kept between consecutive checkpoints;
  across seeds, the same after matching expert ids (expert j of one seed may be expert i of
  another): the matching maximizes shared assignments (Hungarian, scipy).
- the dead-expert timeline: experts that get no held-out assignment, per checkpoint.
Functions return rows; `render_markdown` and `write_figures` are the only renderers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from moejax import files
from moejax.errors import CheckpointError, ConfigError


@dataclasses.dataclass
class Replay:
  """One run's routing on the slice: masks[step] is [n_moe, T, E] (True where the token uses the expert)."""
  workdir: str
  token_T: np.ndarray
  document_T: np.ndarray
  masks: dict[int, np.ndarray]
  moe_layers: list[int]


def assignment_mask(experts_TK: np.ndarray, num_experts: int) -> np.ndarray:
  """[T, E] bool from expert ids [T, K]; ids outside [0, E) (expert choice's 'not taken') are dropped."""
  experts_TK = np.asarray(experts_TK)
  mask = np.zeros((experts_TK.shape[0], num_experts), bool)
  rows, cols = np.nonzero((experts_TK >= 0) & (experts_TK < num_experts))
  mask[rows, experts_TK[rows, cols]] = True
  return mask


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-np.sum(p * np.log2(p)))


def mutual_information(labels_T: np.ndarray, mask_TE: np.ndarray) -> dict[str, float]:
  """{'mi', 'h_expert', 'h_label'} in bits of the assignment-level joint of (label, expert) (module docstring)."""
  used_T = mask_TE.sum(1)
  keep = used_T > 0
  weights_TE = mask_TE[keep] / used_T[keep, None]
  _, label_T = np.unique(np.asarray(labels_T)[keep], return_inverse=True)
  joint_VE = np.zeros((label_T.max() + 1 if label_T.size else 0, mask_TE.shape[1]))
  np.add.at(joint_VE, label_T, weights_TE)
  joint_VE /= max(joint_VE.sum(), 1e-30)
  h_label, h_expert = _entropy(joint_VE.sum(1)), _entropy(joint_VE.sum(0))
  return {'mi': h_label + h_expert - _entropy(joint_VE.ravel()), 'h_expert': h_expert, 'h_label': h_label}


def shuffled_mi(labels_T: np.ndarray, mask_TE: np.ndarray, seed: int = 0) -> float:
  """The MI with the labels permuted: what the plug-in estimator reports for an independent router."""
  return mutual_information(np.random.default_rng(seed).permutation(labels_T), mask_TE)['mi']


def overlap(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
  """Mean over tokens of |S_a & S_b| / max(|S_a|, |S_b|) (tokens with no expert in either are skipped)."""
  size = np.maximum(mask_a.sum(1), mask_b.sum(1))
  keep = size > 0
  return float(np.mean((mask_a & mask_b).sum(1)[keep] / size[keep])) if keep.any() else float('nan')


def match_experts(mask_a: np.ndarray, mask_b: np.ndarray) -> np.ndarray:
  """perm with mask_b[:, perm] aligned to mask_a: expert perm[i] of b matched to expert i of a."""
  from scipy.optimize import linear_sum_assignment  # pylint: disable=import-outside-toplevel
  shared_EE = mask_a.astype(np.float64).T @ mask_b.astype(np.float64)
  rows, cols = linear_sum_assignment(-shared_EE)
  return cols[np.argsort(rows)]


def specialisation_rows(replays: Sequence[Replay]) -> list[dict]:
  """Per run, step and MoE layer: MI with token and document (and their shuffled baselines), H(expert), dead."""
  rows = []
  for r in replays:
    for step in sorted(r.masks):
      for i, layer in enumerate(r.moe_layers):
        mask = r.masks[step][i]
        tok, doc = mutual_information(r.token_T, mask), mutual_information(r.document_T, mask)
        rows.append({'run': os.path.basename(os.path.normpath(r.workdir)), 'step': step, 'layer': layer,
                     'mi_token': tok['mi'], 'mi_token_shuffled': shuffled_mi(r.token_T, mask),
                     'h_expert': tok['h_expert'], 'h_token': tok['h_label'], 'mi_document': doc['mi'],
                     'mi_document_shuffled': shuffled_mi(r.document_T, mask),
                     'dead_experts': int(np.sum(mask.sum(0) == 0))})
  return rows


def stability_rows(replays: Sequence[Replay]) -> list[dict]:
  """Per run, consecutive kept checkpoints and MoE layer: the mean share of each token's experts kept."""
  rows = []
  for r in replays:
    steps = sorted(r.masks)
    for a, b in zip(steps, steps[1:]):
      for i, layer in enumerate(r.moe_layers):
        rows.append({'run': os.path.basename(os.path.normpath(r.workdir)), 'from_step': a, 'to_step': b,
                     'layer': layer, 'overlap': overlap(r.masks[a][i], r.masks[b][i])})
  return rows


def seed_rows(replays: Sequence[Replay]) -> list[dict]:
  """Per pair of runs, common step and MoE layer: overlap of expert sets, raw ids and after matching experts."""
  rows = []
  for x in range(len(replays)):
    for y in range(x + 1, len(replays)):
      ra, rb = replays[x], replays[y]
      if not np.array_equal(ra.token_T, rb.token_T):
        raise ConfigError(f'{ra.workdir} and {rb.workdir} replay different held-out slices: compare seeds of one '
                          'configuration (same data and tokenizer)')
      for step in sorted(set(ra.masks) & set(rb.masks)):
        for i, layer in enumerate(ra.moe_layers):
          a, b = ra.masks[step][i], rb.masks[step][i]
          rows.append({'run_a': os.path.basename(os.path.normpath(ra.workdir)),
                       'run_b': os.path.basename(os.path.normpath(rb.workdir)), 'step': step, 'layer': layer,
                       'overlap_raw': overlap(a, b), 'overlap_matched': overlap(a, b[:, match_experts(a, b)])})
  return rows


def analyse(replays: Sequence[Replay]) -> dict[str, list[dict]]:
  """The three tables of `moejax.routes`."""
  return {'specialisation': specialisation_rows(replays), 'stability': stability_rows(replays),
          'seeds': seed_rows(replays)}


def _cell(value) -> str:
  return f'{value:.4f}' if isinstance(value, float) else str(value)


def render_markdown(tables: dict[str, list[dict]], slice_tokens: int) -> str:
  """The report: one Markdown table per analysis (the only place rows become text)."""
  titles = {'specialisation': 'Specialisation (bits) and dead experts', 'stability':
            'Stability across checkpoints (share of each token\'s experts kept)',
            'seeds': 'Stability across seeds (raw expert ids, and after matching experts)'}
  out = [f'# Routing analysis\n\nHeld-out slice: {slice_tokens} tokens; MI in bits over assignments '
         '(moejax/studies/routes.py).\n']
  for name, rows in tables.items():
    out.append(f'## {titles[name]}\n')
    if not rows:
      out.append('(none: needs two kept checkpoints, or two runs)\n')
      continue
    keys = list(rows[0])
    out += ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
    out += ['| ' + ' | '.join(_cell(row[k]) for k in keys) + ' |' for row in rows] + ['']
  return '\n'.join(out)


def write_figures(tables: dict[str, list[dict]], out_dir: str) -> list[str]:
  """routes_specialisation.png, routes_stability.png and routes_dead.png in `out_dir` (atomic writes)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  spec, stab = tables['specialisation'], tables['stability']
  series = [('routes_specialisation.png', spec, 'step', [('mi_token', 'MI(expert; token)'),
                                                         ('mi_document', 'MI(expert; document)')], 'bits'),
            ('routes_stability.png', stab, 'to_step', [('overlap', 'top-k overlap with previous kept step')],
             'share of experts kept'),
            ('routes_dead.png', spec, 'step', [('dead_experts', 'dead experts')], 'experts')]
  paths = []
  for name, rows, x_key, ys, ylabel in series:
    if not rows:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for y_key, label in ys:
      for run, layer in sorted({(r['run'], r['layer']) for r in rows}):
        pts = sorted((r[x_key], r[y_key]) for r in rows if r['run'] == run and r['layer'] == layer)
        ax.plot(*zip(*pts), marker='o', label=f'{label}, {run} layer {layer}')
    ax.set_xlabel('training step')
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, format='png', dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def heldout_slice(corpus, seq_len: int, sequences: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [S, L], documents [S, L]): the first S*L held-out tokens and each one's document index."""
  from moejax.data import pipeline  # pylint: disable=import-outside-toplevel
  stream = pipeline.heldout_stream(corpus)
  sequences = min(sequences, (stream.size - 1) // seq_len)
  if sequences < 1:
    raise ConfigError(f'the held-out split has fewer than {seq_len} tokens: raise data.heldout_bytes')
  tokens = stream[:sequences * seq_len]
  documents = np.cumsum(tokens == corpus.tokenizer.separator)
  return tokens.reshape(sequences, seq_len), documents.reshape(sequences, seq_len)


def replay(workdir: str, sequences: int) -> Replay:
  """Routes of every kept checkpoint of `workdir` on its corpus's first held-out sequences."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax import config as config_lib, data  # pylint: disable=import-outside-toplevel
  from moejax.model import stack  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint, restore, state as state_lib  # pylint: disable=import-outside-toplevel
  cfg = restore.load_config(workdir)
  if not cfg.moe.num_experts:
    raise ConfigError(f'{workdir} is a dense run: there is no routing to analyse')
  restore.check_corpus_given(cfg, workdir)
  corpus = data.corpus_from_config(cfg.data)
  B, L = cfg.eval.batch_size, cfg.data.seq_len
  tokens_SL, documents_SL = heldout_slice(corpus, L, sequences)
  S = tokens_SL.shape[0] // B * B
  if S == 0:
    raise ConfigError(f'--sequences and the held-out split give fewer than eval.batch_size={B} sequences')
  graphdef, abstract = state_lib.abstract_state(stack.unscanned(cfg))  # (decoding runs the layers one by one)
  E, layers = cfg.moe.num_experts, config_lib.moe_layers(cfg.model, cfg.moe)

  @jax.jit
  def routes(params, buffers, tokens_BL):
    model = nnx.merge(graphdef, params, buffers)
    positions = jnp.broadcast_to(jnp.arange(L), tokens_BL.shape)
    return model(tokens_BL, positions_BL=positions, cache=model.init_cache(B, L), moe_dispatch='model')[1]['routes']

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), use_async=False)
  masks = {}
  try:
    steps = ckpt.steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {workdir}/checkpoints to analyse')
    for step in steps:
      state, _ = ckpt.restore(step, abstract)
      per_batch = [jax.device_get(routes(state['params'], state['buffers'], jnp.asarray(tokens_SL[b:b + B])))
                   for b in range(0, S, B)]
      masks[step] = np.stack([np.concatenate([assignment_mask(batch[i], E) for batch in per_batch])
                              for i in range(len(layers))])
  finally:
    ckpt.close()
  return Replay(workdir, tokens_SL[:S].reshape(-1), documents_SL[:S].reshape(-1), masks, layers)


def run(workdirs: Sequence[str], sequences: int, out_dir: str) -> dict:
  """Replays every workdir, writes routes.md, routes.json and the figures to `out_dir`; returns the tables."""
  replays = [replay(w, sequences) for w in workdirs]
  tables = analyse(replays)
  os.makedirs(out_dir, exist_ok=True)
  slice_tokens = int(replays[0].token_T.size)
  files.atomic_write(os.path.join(out_dir, 'routes.md'), render_markdown(tables, slice_tokens))
  files.atomic_write_json(os.path.join(out_dir, 'routes.json'), dict(tables, slice_tokens=slice_tokens))
  write_figures(tables, out_dir)
  return tables
