"""The claims report: grid matching by config hash, verdicts from constructed losses, and the CLI."""

import json
import os
import subprocess
import sys

import pytest

from moejax import accounting, claims, config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_grid_results(root, loss_of, skip=()):
  """result.json for every tiny paper-grid point, with loss_of(point) as the held-out loss."""
  written = set()
  for name in ('paper_a', 'paper_b'):
    module = config_lib.load_module(os.path.join(ROOT, 'experiments', f'{name}.py'))
    base = module.get_config('tiny')
    for grid, points in module.grids('tiny').items():
      if grid in skip:
        continue
      for p0 in points:
        for seed in (0, 1, 2):  # three seeds of every configuration: the pooled noise has enough dof
          p = dict(p0, seed=seed, name=p0['name'].split('-seed')[0] + (f'-seed{seed}' if seed else ''))
          if p['name'] in written:
            continue
          written.add(p['name'])
          cfg = config_lib.validate(config_lib.apply_overrides(base, p))
          record = {'name': p['name'], 'config': json.loads(cfg.to_json_best_effort()),
                    'accounting': accounting.count(cfg), 'eval': {'loss': loss_of(p), 'bits_per_byte': 3.0},
                    'train': {'tokens': 1000}, 'data': {'fingerprint': 'ab' * 32},
                    'platform': {'device_kind': 'cpu', 'backend': 'cpu', 'jax': 'x'}}
          os.makedirs(os.path.join(root, p['name']))
          with open(os.path.join(root, p['name'], 'result.json'), 'w') as f:
            json.dump(record, f)


CENTER = 1.90  # B1 at s = 16 (e32k2f64), the reference of B3-B6
LOSSES = {
    # B1 (k=2, f=64): falls with E, diminishing returns; the true dense baseline is worse still
    'dense-f128': 2.12, 'e2k2f64': 2.10, 'e8k2f64': 1.98, 'e32k2f64': CENTER, 'e128k2f64': 1.86,
    # A1 (E=32, f=32): rises with s
    'e32k16f32': 1.80, 'e32k4f32': 1.88, 'e32k1f32': 1.95,
    # A2a: more experts at smaller width, slightly worse
    'e4k1f72-d144': 1.90, 'e16k4f44-d88': 1.92, 'e64k16f24-d48': 1.95,
    # B2 / A2b at s = 8 (finer is better), B2s32 at s = 32: best d_exp is 8 in both
    'e8k1f128': 1.97, 'e128k16f8': 1.84, 'e32k1f128': 1.95, 'e128k4f32': 1.90, 'e512k16f8': 1.82,
    # B3-B5: small effects; B6: dropping hurts
    'e31k1f64-sh1': CENTER + 0.001, 'e32k2f64-het': CENTER - 0.001, 'e32k2f64-lb_sequence': CENTER + 0.002,
    'e32k2f64-lb_auxfree': CENTER, 'e32k2f64-lb_none': CENTER + 0.001,
    'e32k2f64-cf1.0': CENTER + 0.05, 'e32k2f64-cf1.25': CENTER + 0.03,
}


def _loss(p):
  """Built so every claim but C-A2b (finer experts win) holds; seeds differ by +-0.004 (sigma 0.004)."""
  noise = {0: 0.0, 1: 0.004, 2: -0.004}[p['seed']]
  if p['name'].startswith('A4-'):  # the searched design wins
    return (1.85 if p['name'].startswith('A4-top') else 1.95 + 0.01 * int(p['name'][7])) + noise
  return LOSSES[p['name'].split('-seed')[0]] + noise


def test_verdicts_on_constructed_losses(tmp_path):
  _write_grid_results(str(tmp_path), _loss)
  text = claims.run(str(tmp_path), 'tiny', str(tmp_path / 'out'), bootstrap=5, fit_starts=4)  # (fits: scaling_test)
  found = {}
  for line in text.splitlines():
    if line.startswith('| C-') or line.startswith('| prior'):
      cells = [c.strip() for c in line.strip('|').split('|')]
      found.setdefault(cells[0], []).append(cells[5].strip('*'))
  assert found['C-A1'] == ['holds']
  assert found['C-A2'] == ['holds']
  assert found['C-A2b'] == ['contradicted']  # finer experts won, against paper A's rule
  assert found['C-B1'] == ['holds'] and found['prior'] == ['holds']
  assert found['C-B2'] == ['holds']
  assert found['C-B3'] == ['holds'] and found['C-B4'] == ['holds'] and found['C-B5'] == ['holds'] * 3
  assert found['C-B6'] == ['holds']
  assert found['C-A4'] == ['holds']
  assert 'σ = 0.0040' in text and 'finer experts win' in text
  assert os.path.exists(tmp_path / 'out' / 'report.md') and os.path.exists(tmp_path / 'out' / 'loss_vs_sparsity.png')
  assert '## Claims' in open(tmp_path / 'out' / 'report.md').read()


def test_missing_grids_and_no_replicates_are_inconclusive(tmp_path):
  _write_grid_results(str(tmp_path), lambda p: 2.0 + 0.01 * p['seed'], skip=('B6', 'B2s32', 'A1'))
  rows = claims.results.table(claims.results.gather(str(tmp_path)).records)[0]
  got = {c.id: c for c in claims.evaluate(rows, 'tiny')[0]}
  assert got['C-A1'].verdict == 'inconclusive' and 'missing' in got['C-A1'].detail
  assert got['C-B2'].verdict == 'inconclusive' and 'B2s32' in got['C-B2'].detail
  assert got['C-B6'].verdict == 'inconclusive'
  assert claims.pooled_sigma(rows)[0] == pytest.approx(0.01)


def test_intervals_use_t_quantiles_and_need_six_degrees_of_freedom():
  a, b = {'seeds': 2}, {'seeds': 2}
  assert claims.Noise(0.01, 2).half_width(a, b) is None  # too few degrees of freedom: no interval
  assert claims.Noise(0.01, 6).half_width(a, b) == pytest.approx(2.446912 * 0.01)  # t(0.975, 6), not 1.96
  assert claims.Noise(0.01, 6).half_width(a, b, level=0.90) == pytest.approx(1.943180 * 0.01)
  big = {'loss_mean': 2.0, 'name': 'c', 'seeds': 2}
  near = dict(big, loss_mean=2.001, name='v')
  # TOST: equivalence needs the 90% interval inside +-T, not only |delta| < T
  assert claims._small_effect('X', 'g', 's', big, near, 0.005, claims.Noise(0.01, 6)).verdict == 'inconclusive'
  assert claims._small_effect('X', 'g', 's', big, near, 0.05, claims.Noise(0.01, 6)).verdict == 'holds'
  # a non-monotone series is inconclusive whichever way its ends point
  series = [dict(big, sparsity=s, loss_mean=l) for s, l in ((1, 2.0), (2, 1.7), (4, 1.8))]
  for sign in (+1, -1):
    c = claims._trend_claim('X', 's', 'e', 'g', series, 'sparsity', sign, claims.Noise(0.001, 20))
    assert c.verdict == 'inconclusive' and 'not monotone' in c.detail


def test_claims_cli_without_runs(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'moejax.claims', f'--root={tmp_path}', f'--out={tmp_path}/o'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and out.stderr.strip().startswith('moejax: error: no complete result.json')
