"""The claims report: grid matching by config hash, verdicts from constructed losses, and the CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import math

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.errors import DataError, Interrupted, WorkdirError
from moejax.model import accounting
from moejax.studies import claims, figures, power, render, report, results, statistics, summaries, verdicts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_grid_results(root, loss_of, skip=(), seeds=(0, 1, 2)):
  """result.json for every tiny paper-grid point, with loss_of(point) as the held-out loss."""
  written = set()
  for name in ('paper_a', 'paper_b'):
    module = config_lib.load_module(os.path.join(ROOT, 'experiments', f'{name}.py'))
    base = module.get_config('tiny')
    for grid, points in module.designs('tiny').items():
      if grid in skip:
        continue
      for p0 in points:
        for seed in seeds:  # three seeds of every configuration: the pooled noise has enough dof
          p = dict(p0, seed=seed, name=p0['name'].split('-seed')[0] + (f'-seed{seed}' if seed else ''),
                   **{'data.seed': seed})
          if p['name'] in written:
            continue
          written.add(p['name'])
          cfg = config_lib.validate(config_lib.apply_overrides(base, p))
          loss = loss_of(p)
          load = 6.0 if 'lb_none' in p['name'] else 1.5
          record = {'name': p['name'], 'config': json.loads(cfg.to_json_best_effort()),
                    'accounting': accounting.count(cfg), 'eval': {'loss': loss, 'bits_per_byte': 3.0},
                    'train': {'tokens': 1000, 'wall_s': 10.0}, 'data': {'fingerprint': 'ab' * 32},
                    'routing': {'layers': [{'load_max_over_mean': load, 'dead_experts': 0}]},
                    'decay_curve': [{'step': 1, 'tokens': 250, 'loss': loss + 0.3},
                                    {'step': 2, 'tokens': 500, 'loss': loss + 0.1},
                                    {'step': 4, 'tokens': 1000, 'loss': loss}],
                    'platform': {'device_kind': 'cpu', 'backend': 'cpu', 'jax': 'x'}}
          os.makedirs(os.path.join(root, p['name']))
          with open(os.path.join(root, p['name'], 'result.json'), 'w') as f:
            json.dump(record, f)


CENTER = 1.90  # B1 at s = 16 (e32k2f64), the reference of B4-B6
LOSSES = {
    # B1 (k=2, f=64): falls with E, diminishing returns; the true dense baseline is worse still
    'dense-f128': 2.12, 'e8k2f64': 1.98, 'e32k2f64': CENTER, 'e128k2f64': 1.86,
    # A1 (E=32, f=32): rises with s (k = 16, 8, 4, 2)
    'e32k16f32': 1.80, 'e32k8f32': 1.84, 'e32k4f32': 1.88, 'e32k2f32': 1.95,
    # A2a: more experts at smaller width, slightly worse
    'e8k2f72-d144': 1.90, 'e16k4f54-d108': 1.92, 'e32k8f40-d80': 1.95,
    # B2 (= A2b) at s = 8 and B2s32: a bowl with its bottom at d_exp 48 in both; B2p (wider): at d_exp 72
    'e16k2f96': 1.95, 'e24k3f64': 1.90, 'e32k4f48': 1.86, 'e48k6f32': 1.90, 'e64k8f24': 1.95,
    'e64k2f96': 1.92, 'e128k4f48': 1.83, 'e256k8f24': 1.92,
    'e16k2f144-d96': 1.80, 'e24k3f96-d96': 1.75, 'e32k4f72-d96': 1.70, 'e48k6f48-d96': 1.75, 'e64k8f36-d96': 1.80,
    # B3-B5: small effects; no balancing collapses; B6: loss falls as the capacity factor rises
    'e31k3f32-sh1': 1.88 + 0.001, 'e32k2f64-het': CENTER - 0.001, 'e32k2f64-lb_sequence': CENTER + 0.002,
    'e32k2f64-lb_auxfree': CENTER, 'e32k2f64-lb_none': CENTER + 0.05,
    'e32k2f64-cf0.5': CENTER + 0.08, 'e32k2f64-cf1': CENTER + 0.05, 'e32k2f64-cf1.25': CENTER + 0.03,
}


def _loss(p):
  """Built so every claim but C-A2b (a bowl: not monotone) holds; seeds differ by +-0.004 (sigma 0.004)."""
  # a shared seed effect (one data order is harder for every configuration) plus per-run noise
  noise = {0: 0.0, 1: 0.004, 2: -0.004}[p['seed']] + 0.002 * ((len(p['name']) + p['seed']) % 3 - 1)
  if p['name'].startswith('A4-'):  # the searched design wins
    return (1.85 if p['name'].startswith('A4-top') else 1.95 + 0.01 * int(p['name'][7])) + noise
  name = p['name'].split('-seed')[0]
  if '-lr' in name:  # the learning-rate sweep: both neighbours of the chosen rate are worse
    return LOSSES[name.split('-lr')[0]] + 0.05 + noise
  return LOSSES[name] + noise


def test_verdicts_on_constructed_losses(tmp_path, monkeypatch):
  _write_grid_results(str(tmp_path), _loss)
  # (fit quality is scaling_test's; leave-one-out refits of three families would take minutes here)
  s = report.study(str(tmp_path), 'tiny', bootstrap=2, fit_starts=2, loo=False)
  found = {}
  for c in s.claims:
    found.setdefault(c.id, []).append(c.verdict)
  assert found['C-A1'] == ['holds']
  assert found['C-A2'] == ['holds']
  assert found['C-A2b'] == ['inconclusive']  # a bowl is neither side's monotone prediction
  assert found['C-B1'] == ['holds'] and found['prior'] == ['holds']
  assert found['C-B2'] == ['holds'] and found['C-B2a'] == ['holds']
  assert found['C-B3'] == ['holds'] and found['C-B4'] == ['holds'] and found['C-B5'] == ['holds'] * 2
  assert found['C-B5n'] == ['holds']  # the collapse check is its own row
  assert found['C-B6'] == ['holds']
  assert found['C-A4'] == ['inconclusive']  # 3 random designs: 2 dof for the spread between designs
  assert 'random designs' in next(c for c in s.claims if c.id == 'C-A4').needs
  a2b = next(c for c in s.claims if c.id == 'C-A2b')
  assert 'lowest loss at E = 32' in a2b.detail
  literature = summaries.literature_rows(s.claims)
  assert [r['id'] for r in literature][-1] == 'C-B6'  # the literature has every claim
  assert next(r for r in literature if r['id'] == 'C-B5')['ours'] == ['holds (sequence)', 'holds (aux_free)']
  assert set(s.fits) == {'A', 'B', 'all'} and 'constant' in s.fits['A'] and 'log_linear' in s.fits['B']
  assert s.fits['A']['constant'].extrapolation_rmse is not None  # the largest-N_total refit is scored
  speed = {r['row']['name']: r for r in s.speedup['rows']}
  assert s.speedup['dense']['name'] == 'dense-f128' and speed['e128k2f64']['row']['sparsity'] == 64
  rates, lr = s.lr
  assert [r['anchor'] for r in lr][0] == 'dense-f128' and all(r['bracketed'] and r['vertex'] for r in lr)
  # the report's other rows: the claims at every budget (the same decay offset for every run: the same effects),
  # speedup intervals, the best expert size, the token law
  assert [st.tokens for st in s.stages] == [250, 500, 1000]
  a1 = next(e for e in s.effects if e['id'] == 'C-A1')
  assert [c['claim'].delta for c in a1['cells']] == pytest.approx([a1['cells'][-1]['claim'].delta] * 3)
  assert all(r['interval'] and r['interval'][0] < r['speedup'] < r['interval'][1] for r in s.speedup['rows'])
  assert [r['grid'] for r in s.best_expert] == ['B2', 'B2s32', 'B2p'] and s.best_expert[0]['best'] == 48
  assert set(s.token_fits) >= {'constant', 'log_linear_tokens'}
  assert all(len(c.per_seed) == 3 for c in s.claims if c.kind in ('direction', 'trend', 'equivalence'))
  text = report.write_claims(s, str(tmp_path / 'out'))
  out = tmp_path / 'out'
  assert open(out / 'claims.md').read() == text and '## Claims' in open(out / 'report.md').read()
  for section in ('| per seed |', '## Every effect with its interval', '## The claims at every budget',
                  '## Best expert size against N_active', '### Loss against N_active and training tokens'):
    assert section in text, section
  for name in ('loss_vs_sparsity.png', 'grid_B2.png', 'grid_LR.png', 'forest.png', 'best_expert.png'):
    assert os.path.getsize(out / name) > 1000
  lone = {'B2': s.grids['B2'], 'B5': [s.grids['B5'][0]] + [None] * (len(s.grids['B5']) - 1)}  # B5: its centre only
  report.write_report(s.root, str(tmp_path / 'lone'), grids=lone, gathered=s.gathered, noise=s.noise['noise'])
  assert os.path.exists(tmp_path / 'lone' / 'grid_B2.png') and not os.path.exists(tmp_path / 'lone' / 'grid_B5.png')
  assert 'grid_B5.png' not in open(tmp_path / 'lone' / 'report.md').read()
  # a report interrupted, or stopped by a full disk, while its files are written leaves the previous set whole
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}
  def stop(error):
    def figure(*args):
      raise error
    return figure
  monkeypatch.setattr(figures, 'grid_figure', stop(KeyboardInterrupt()))  # after forest.png and the loss plots
  with pytest.raises(Interrupted, match='the claims report was not written; the files under .* are as they were'):
    report.write_claims(s, str(out))
  monkeypatch.setattr(figures, 'grid_figure', stop(OSError(28, 'No space left on device')))
  with pytest.raises(WorkdirError, match='cannot write the claims report under .*: No space left on device'):
    report.write_claims(s, str(out))
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # no file changed, no temp left


def test_missing_grids_and_no_replicates_are_inconclusive(tmp_path):
  _write_grid_results(str(tmp_path), lambda p: 2.0 + 0.01 * p['seed'], skip=('B6', 'B2s32', 'A1'), seeds=(0, 1))
  rows = results.table(results.gather(str(tmp_path)).records)[0]
  got = {c.id: c for c in claims.evaluate(rows, 'tiny')[0]}
  assert got['C-A1'].verdict == 'inconclusive' and 'missing' in got['C-A1'].detail
  ours = {r['id']: r['ours'] for r in summaries.literature_rows(list(got.values()))}
  assert ours['C-A1'] == ['not run'] and ours['C-B6'] == ['not run']  # not a verdict on runs that never ran
  assert got['C-B2'].verdict == 'inconclusive' and 'B2s32' in got['C-B2'].detail
  assert got['C-B6'].verdict == 'inconclusive'
  assert statistics.pooled_sigma(rows)[0] == pytest.approx(0.01 / 2 ** 0.5)


def test_intervals_use_t_quantiles_and_need_six_degrees_of_freedom():
  a, b = {'seeds': 2}, {'seeds': 2}
  assert statistics.Noise(0.01, 2).half_width(a, b) is None  # too few degrees of freedom: no interval
  assert statistics.Noise(0.01, 6).half_width(a, b) == pytest.approx(2.446912 * 0.01)  # t(0.975, 6), not 1.96
  assert statistics.Noise(0.01, 6).half_width(a, b, level=0.90) == pytest.approx(1.943180 * 0.01)
  big = {'loss_mean': 2.0, 'name': 'c', 'seeds': 2}
  near = dict(big, loss_mean=2.001, name='v')
  # TOST: equivalence needs the 90% interval inside +-T, not only |delta| < T
  assert verdicts.small_effect('X', 'g', 's', big, near, 0.005, statistics.Noise(0.01, 6)).verdict == 'inconclusive'
  assert verdicts.small_effect('X', 'g', 's', big, near, 0.05, statistics.Noise(0.01, 6)).verdict == 'holds'
  # a non-monotone series is inconclusive whichever way its ends point
  series = [dict(big, sparsity=s, loss_mean=l) for s, l in ((1, 2.0), (2, 1.7), (4, 1.8))]
  for sign in (+1, -1):
    c = verdicts.trend_claim('X', 's', 'e', 'g', series, 'sparsity', sign, statistics.Noise(0.001, 20))
    assert c.verdict == 'inconclusive' and 'not monotone' in c.detail


def test_claims_cli_without_runs(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'moejax.claims', f'--root={tmp_path}', f'--out={tmp_path}/o'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and out.stderr.strip().startswith('moejax: error: no complete result.json')


def _b2_grids(rng, bowl8, bowl32, sigma=0.01):
  """B2 (5 sizes) and B2s32 (3 sizes) rows: loss = bowl(size) + the seed noise of a 2-seed mean."""
  def rows(sizes, bowl):
    return [{'name': f'f{f}', 'expert_hidden': f, 'seeds': 2, 'n_active': 1e5,
             'loss_mean': 2.0 + bowl(math.log2(f)) + rng.normal(0, sigma / 2 ** 0.5)} for f in sizes]
  return {'B2': rows((96, 64, 48, 32, 24), bowl8), 'B2s32': rows((96, 48, 24), bowl32)}


def test_b2_argmin_rule_does_not_call_pure_noise_a_hold():
  # The old argmin rule said "holds" for pure noise 7 times in 9; the interval rule must not.
  noise = statistics.Noise(0.01, 40)
  flat = lambda x: 0.0
  got = [claims._b2_claims(_b2_grids(np.random.default_rng(i), flat, flat), noise)[0].verdict for i in range(9)]
  assert got.count("holds") <= 1, got
  bowl = lambda x: 0.2 * (x - math.log2(48)) ** 2  # a clear optimum at 48 at both sparsities
  assert claims._b2_claims(_b2_grids(np.random.default_rng(0), bowl, bowl), noise)[0].verdict == 'holds'
  moved = lambda x: 0.2 * (x - math.log2(24)) ** 2  # the optimum moved to 24 at s = 32
  assert claims._b2_claims(_b2_grids(np.random.default_rng(0), bowl, moved), noise)[0].verdict == 'contradicted'


def test_holm_and_hinging_points():
  made = [verdicts.Claim(str(i), '', '', '', '', 'holds', p=p) for i, p in enumerate((0.001, 0.03, 0.004))]
  kept = statistics.holm(made + [verdicts.Claim('x', '', '', '', '', 'inconclusive', p=0.5)])
  assert kept == {'0#0': True, '2#2': True, '1#1': False}  # 0.001 < 0.025/3, 0.004 < 0.025/2, 0.03 > 0.025
  pts = [{'name': n, 'seeds': 2, 'x': x, 'loss_mean': l} for n, x, l in (('a', 1, 2.0), ('b', 2, 1.9), ('c', 4, 1.6))]
  c = verdicts.trend_claim('X', 's', 'e', 'g', pts, 'x', -1, statistics.Noise(0.05, 20))
  assert c.verdict == 'inconclusive' and any('rests on one point' in f for f in c.flags)  # never on one point


def test_a_verdict_that_one_seed_carries_is_inconclusive():
  """The referee's C-B5 case as a sign claim: +0.020 and +0.125 in two seeds agree in sign and stay decided; one
  seed's outlier (+0.15 against -0.01 and -0.02) carries the mean, so leaving it out flips the sign: inconclusive,
  flagged with that seed. Equivalence claims are not sign claims and are left alone."""
  def claim(per_seed, kind='direction'):
    return verdicts.Claim('X', 's', 'e', '', '', 'holds', '', kind=kind, delta=float(np.mean(list(per_seed.values()))),
                          per_seed=per_seed)
  agree = claim({'0/0': 0.020, '1/1': 0.125})
  carried = claim({'0/0': -0.01, '1/1': -0.02, '2/2': 0.15}, kind='trend')
  small = claim({'0/0': 0.001, '1/1': -0.003}, kind='equivalence')
  verdicts.seed_check([agree, carried, small])
  assert agree.verdict == 'holds' and not agree.flags
  assert carried.verdict == 'inconclusive' and carried.flags == ['holds only with seed 2: rests on one seed, so '
                                                                 'inconclusive'] and 'without seed 2' in carried.needs
  assert small.verdict == 'holds'
  mixed = claim({'0/0': 0.05, '1/1': 0.04, '2/2': -0.01})  # one seed against, but the others' mean keeps the sign
  verdicts.seed_check([mixed])
  assert mixed.verdict == 'holds'
  # the decided direction comes from the verdict and the expected sign, not from Δ: a trend contradicted by its
  # slope while its end-to-end Δ is positive is checked against the slope's (negative) direction
  against = dataclasses.replace(claim({'0/0': -0.02, '1/1': -0.03}, kind='trend'), verdict='contradicted',
                                expected='Δ = L(E_max) − L(E_min) > 0', delta=0.01)
  verdicts.seed_check([against])
  assert against.verdict == 'contradicted'


def test_the_claims_never_decide_on_one_seed(tmp_path):
  """claims.evaluate applies the seed check: the prior's MoE beats dense by 0.3 nats in seed 2 alone (seeds 0 and 1:
  +0.002, the wrong way), which decides the mean at three seeds; the verdict says it rests on seed 2."""
  def loss(p):
    name, seed = p['name'].split('-seed')[0], p['seed']
    return 2.0 + 0.001 * (len(name) % 5) + (0.002 - (0.3 if seed == 2 else 0.0) if name == 'e8k2f64' else 0.0)
  _write_grid_results(str(tmp_path), loss)
  rows = results.table(results.gather(str(tmp_path)).records)[0]
  prior = next(c for c in claims.evaluate(rows, 'tiny')[0] if c.id == 'prior')
  assert prior.delta < 0 and prior.p < 0.025  # the t-test alone would decide it
  assert prior.verdict == 'inconclusive' and prior.flags == ['holds only with seed 2: rests on one seed, so inconclusive']


def test_seeds_to_decide_a_hinging_trend_count_the_drop_one_check():
  """tiny2's C-A1 shape: monotone, the slope test holds, but dropping the last point leaves a series that does not
  decide. The pair formula on the end-to-end difference said 2 seeds (those it had); the simulation of the real
  rule (slope test and every drop-one series, the measured means as the truth) asks for more, and is the least
  such count."""
  means = (1.4625, 1.4641, 1.4865, 1.4984)
  pts = [{'name': f'p{i}', 'x': i, 'seeds': 2, 'loss_mean': m} for i, m in enumerate(means)]
  noise = statistics.Noise(0.0114, 16)
  c = verdicts.trend_claim('X', 's', 'e', 'g', pts, 'x', +1, noise)
  assert c.verdict == 'inconclusive' and c.flags == ['holds only with p3 (x=3): rests on one point, so inconclusive']
  assert noise.seeds_to_resolve(means[-1] - means[0]) == 2  # the old answer: the seeds the series already has
  n = int(c.needs.split('≈ ')[1].split(' ')[0])
  profile = np.array(means) - means[0]
  pw = lambda k: power.power_trend(k, None, 4, 0.0114, 4, profile=profile)
  assert n > 2 and pw(n) >= 0.8 > pw(n - 1)
  assert power.power_trend(6, 0.03, 4, 0.01, 4, seed=1) == power.power_trend(6, None, 4, 0.01, 4, seed=1,
                                                                              profile=np.linspace(0, 0.03, 4))
  falling = [dict(p, loss_mean=2 * means[0] - m) for p, m in zip(pts, means)]  # the same series, mirrored
  assert verdicts.needs_trend(falling, noise) == c.needs
  flat = [dict(p, loss_mean=m) for p, m in zip(pts, (1.50, 1.40, 1.50))]  # no trend: never decided
  assert 'too flat' in verdicts.needs_trend(flat, statistics.Noise(0.05, 16))
  # the direction simulated is the slope's, not the end-to-end difference's: here the series falls after its second
  # point (every drop-one series falls too) but ends 0.0025 above its start
  late = [{'name': f'q{i}', 'x': i, 'seeds': 2, 'loss_mean': 1.5 + 0.05 * v}
          for i, v in enumerate((0, 1, 0.8, 0.6, 0.4, 0.2, 0.05))]
  assert late[-1]['loss_mean'] > late[0]['loss_mean'] and verdicts.needs_trend(late, noise).startswith('≈ ')


def test_speedup_reads_tokens_off_the_decay_curve():
  curve = [{'tokens': 250, 'loss': 2.3}, {'tokens': 500, 'loss': 2.1}, {'tokens': 1000, 'loss': 2.0}]
  tokens, where = summaries.tokens_to_reach(curve, 2.05)
  assert where == '' and 500 < tokens < 1000 and tokens == pytest.approx(500 * 2 ** 0.5)
  assert summaries.tokens_to_reach(curve, 2.5) == (250.0, '<') and summaries.tokens_to_reach(curve, 1.9) == (None, '>')


def test_block_design_noise_removes_the_shared_seed_effect():
  rng = np.random.default_rng(0)
  seed_effect = {'0': 0.0, '1': 0.03}  # seed 1's data order is harder for every configuration
  rows = []
  for c in range(12):
    losses = {k: 2.0 + 0.01 * c + v + rng.normal(0, 0.005) for k, v in seed_effect.items()}
    rows.append({'name': f'c{c}', 'seeds': 2, 'loss_mean': float(np.mean(list(losses.values()))),
                 'loss_std': float(np.std(list(losses.values()), ddof=1)), 'seed_losses': losses})
  noise = statistics.make_noise(rows)
  assert noise.sigma > 0.015  # the pooled seed spread carries the shared effect
  assert noise.paired.dof == 11 and 0.002 < noise.paired.sigma < 0.009  # the residual is the per-run noise
  assert noise.for_pair(rows[0], rows[1]) is noise.paired
  assert noise.for_pair(rows[0], {'seeds': 1, 'seed_losses': {'0': 2.0}}) is noise  # not paired: pooled


def test_noise_check_flags_configurations_whose_seed_spread_is_out_of_line():
  rng = np.random.default_rng(0)
  rows = [{'name': f'c{i}', 'seed_losses': {0: 2.0 + 0.01 * i, 1: 2.0 + 0.01 * i + 0.005 + rng.normal(0, 0.01)}}
          for i in range(30)]
  calm = statistics.noise_check(rows)
  assert calm['outliers'] == [] and 0.005 < calm['robust_sigma'] < 0.015 and calm['configurations'] == 30
  rows[3]['seed_losses'][1] += 0.12
  rows[7]['seed_losses'][1] -= 0.09
  check = statistics.noise_check(rows)
  assert [name for name, _ in check['outliers']] == ['c3', 'c7']  # largest spread first
  assert abs(check['robust_sigma'] - calm['robust_sigma']) < 0.003  # the median is not moved by two points
  assert statistics.block_sigma(rows)[0] > 2 * check['robust_sigma']  # while the pooled sigma is
  lines = render.noise_check_lines(check)
  assert 'c3 (' in lines[0] and 'not homogeneous' in lines[0]


def _seeded(name, losses, **extra):
  return dict({'name': name, 'seeds': len(losses), 'loss_mean': float(np.mean(losses)),
               'seed_losses': {f'{i}/{i}': x for i, x in enumerate(losses)}}, **extra)


def test_every_claim_row_carries_its_per_seed_contrasts():
  noise = statistics.Noise(0.01, 30)
  a, b = _seeded('a', [2.00, 2.10, 2.05]), _seeded('b', [2.01, 2.08, 2.05])
  c = verdicts.small_effect('X', 'g', 's', a, b, 0.05, noise)
  assert c.kind == 'equivalence' and c.per_seed == pytest.approx({'0/0': 0.01, '1/1': -0.02, '2/2': 0.0})
  assert c.delta == pytest.approx(np.mean(list(c.per_seed.values()))) and c.half_width == noise.half_width(a, b)
  assert render.per_seed_cell(c) == '0: +0.0100, 1: -0.0200, 2: +0.0000'
  pts = [_seeded(f'p{i}', [2.0 - 0.1 * i, 2.1 - 0.1 * i], x=i) for i in range(3)]
  t = verdicts.trend_claim('T', 's', 'Δ < 0', 'g', pts, 'x', -1, noise)
  assert t.per_seed == pytest.approx({'0/0': -0.2, '1/1': -0.2}) and t.kind == 'trend'  # end to end, per seed
  top = _seeded('top', [1.8, 1.9], n_total=1e6)
  rand = [_seeded(f'r{i}', [1.9 + 0.01 * i, 2.1], n_total=1e6) for i in range(3)]  # per seed: mean(random) - top
  a4 = claims._a4_claim([top] + rand, noise)  # pylint: disable=protected-access
  assert a4.per_seed == pytest.approx({'0/0': 0.11, '1/1': 0.2})
  b2 = [_seeded(f'f{f}', [2.0 + (0.1 if f != best0 else 0), 2.0 + (0.1 if f != 48 else 0)], expert_hidden=f)
        for f, best0 in ((24, 32), (32, 32), (48, 32))]
  assert verdicts.seed_argmins(b2) == {'0/0': 32, '1/1': 48}


def test_best_expert_size_rows_find_a_known_optimum_per_active_scale():
  def grid(sizes, best, s, n_active):  # a bowl in log2 d_exp with its bottom at `best`, two seeds 0.002 apart
    return [_seeded(f'f{f}', [l - 0.001, l + 0.001], expert_hidden=f, sparsity=s, n_active=n_active)
            for f in sizes for l in [2.0 + 0.1 * (math.log2(f / best)) ** 2]]
  g = {'B2': grid((96, 64, 48, 32, 24), 48, 8, 1e5), 'B2s32': grid((96, 48, 24), 48, 32, 1e5),
       'B2p': grid((144, 96, 72, 48, 36), 72, 8, 2e5)}
  rows = {r['grid']: r for r in summaries.best_expert_rows(g, statistics.Noise(0.002, 40))}
  assert [rows[k]['best'] for k in ('B2', 'B2s32', 'B2p')] == [48, 48, 72]
  inside = lambda r: r['lo'] * (1 - 1e-9) <= r['best'] <= r['hi'] * (1 + 1e-9)  # (2 ** log2 d_exp rounding)
  assert all(inside(r) for r in rows.values()) and rows['B2p']['lo'] > 48
  assert rows['B2']['p_best'][rows['B2']['sizes'].index(48)] > 0.5 and rows['B2p']['seed_argmins'] == {'0/0': 72,
                                                                                                     '1/1': 72}
  series = figures.best_expert_series(list(rows.values()))
  assert [p[:2] for p in series['s = 8']] == [(1e5, 48.0), (2e5, 72.0)] and series['s = 32'][0][4:] == (24, 96)
  text = '\n'.join(render.best_expert_lines(list(rows.values())))
  assert '| B2p | 8 |' in text and 'best_expert.png' in text
  g['B2s32'][1] = None
  assert [r['grid'] for r in summaries.best_expert_rows(g, statistics.Noise(0.002, 40))] == ['B2', 'B2p']


def test_the_speedup_interval_covers_the_true_speedup():
  true = [{'tokens': t, 'loss': 1.6 + 3 * (t / 1e5) ** -0.3} for t in (2.5e5, 5e5, 1e6)]  # 3.88, 3.45, 3.10
  target = 3.3
  truth, where = summaries.tokens_to_reach(true, target)
  assert where == ''
  se, rng = 0.01, np.random.default_rng(0)
  for rho in (0.0, 0.8, 1.0):  # how alike one run's losses at the three budgets are
    shared = rng.normal(0, se, (3000, 1))
    noisy = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(0, se, (3000, 3))
    hits = 0
    for d, t in zip(noisy, rng.normal(0, se, 3000)):
      curve = [dict(p, loss=p['loss'] + e) for p, e in zip(true, d)]
      got = summaries.tokens_interval(curve, target + t, se, lambda p: se, 1000)
      hits += got is not None and got[0] <= truth <= got[1]
    assert hits / 3000 > 0.93, (rho, hits / 3000)  # the widest case assumed: at or above 95% for every rho
  narrow = summaries.tokens_interval(true, target, se / 4, lambda p: se / 4, 1000)
  wide = summaries.tokens_interval(true, target, se, lambda p: se, 1000)
  assert wide[0] < narrow[0] < truth < narrow[1] < wide[1]
  assert summaries.tokens_interval(true, 1.0, se, lambda p: se, 30) is None  # never reached: no interval


def test_speedup_rows_carry_an_interval_from_the_noise_at_each_budget():
  curve = lambda losses: [{'tokens': t, 'loss': x, 'n': 2} for t, x in zip((250, 500, 1000), losses)]
  dense = {'name': 'dense', 'seeds': 2, 'decay_curve': curve((2.5, 2.3, 2.1))}
  moe = {'name': 'moe', 'seeds': 2, 'sparsity': 16, 'n_total': 1e6, 'decay_curve': curve((2.4, 2.15, 1.95))}  # reaches 2.1 at 595 tokens
  noise = statistics.ClassNoise({'default': statistics.Noise(0.01, 30)})
  s = summaries.speedup_rows({'B1': [dense, moe]}, {t: noise for t in (250, 500, 1000)})
  x = s['rows'][0]
  assert x['interval'][0] < x['speedup'] < x['interval'][1] and x['speedup'] == pytest.approx(1000 / 500 / 2 ** 0.25)
  assert summaries.speedup_rows({'B1': [dense, moe]})['rows'][0]['interval'] is None  # no noise: no interval
  few = statistics.ClassNoise({'default': statistics.Noise(0.01, 3)})  # too few degrees of freedom
  assert summaries.speedup_rows({'B1': [dense, moe]}, {t: few for t in (250, 500, 1000)})['rows'][0]['interval'] is None
  assert '| [' in render.speedup_table(s) and '95% interval' in render.speedup_table(s)


def test_the_rate_rule_recovers_a_known_width_slope_from_noisy_single_seed_grids():
  """lr_rule on synthetic flat bowls (0.004 nats per (log2 rate)^2, as flat as tiny2's; seed noise 0.004 nats;
  a divergence cliff) whose optimum is 8e-3 (k=2) and 1.2e-2 (k=8) at d=64 and falls as 1/d: the fitted slope is
  near -1, every anchor's rate within 2x of the truth, and on average closer to it than the single-seed argmins
  (in 40 simulated grids: mean |log2 error| 0.26 against 0.49, better in 97% of the 37 it did not refuse as
  flat); rates stay inside the sweep."""
  from moejax.studies import summaries  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  truth = lambda d, k: (8e-3 if k == 2 else 1.2e-2) * 64 / d  # noqa: E731
  points, argmin_error = [], []
  for d in (64, 96, 144):
    for k in (2, 8):
      grid = []
      for lr in (2e-3, 4e-3, 8e-3, 1.6e-2):
        z = np.log2(lr / truth(d, k))
        grid.append({'width': d, 'topk': k, 'lr': lr,
                     'loss': 1.45 + 0.004 * z ** 2 + (0.05 if z > 1.2 else 0) + rng.normal(0, 0.004)})
      points += grid
      argmin_error.append(abs(np.log2(min(grid, key=lambda p: p['loss'])['lr'] / truth(d, k))))
  rule = summaries.lr_rule(points)
  assert -1.6 < rule['slope'] < -0.4, rule
  error = [abs(np.log2(rule['rate'](d, k) / truth(d, k))) for d in (64, 96, 144) for k in (2, 8)]
  assert max(error) < 1 and np.mean(error) < np.mean(argmin_error), (error, argmin_error)
  assert rule['rate'](1024, 2) == 2e-3 and rule['rate'](8, 8) == 1.6e-2  # clamped to the sweep


def test_the_lr_table_shows_the_joint_rule_only_when_widths_vary():
  from moejax.studies import render, summaries  # pylint: disable=import-outside-toplevel
  def row(d, k, lr, loss):
    name = f'e32k{k}f64' + (f'-d{d}' if d != 64 else '') + f'-lr{lr:g}'
    return {'name': name, 'peak_learning_rate': lr, 'loss_mean': loss, 'seed_losses': {'0/0': loss},
            'n_total': 1000 * d, 'model.model_dim': d, 'experts_per_token': k}
  lrs = (2e-3, 4e-3, 8e-3, 1.6e-2)
  grid = [row(d, k, lr, 1.4 + 0.004 * np.log2(lr * d / (64 * 8e-3)) ** 2) for d in (64, 96, 144) for k in (2, 8)
          for lr in lrs]
  rates, rows = summaries.lr_rows({'LR': grid})
  assert all('rule' in r for r in rows) and 'rule (joint fit)' in render.lr_table(rates, rows)
  by = {(r['width'], r['topk']): r['rule'] for r in rows}
  assert abs(np.log2(by[(144, 2)]['fitted'] / (8e-3 * 64 / 144))) < 0.2
  assert by[(64, 2)]['fitted'] == pytest.approx(8e-3, rel=0.1) and by[(64, 2)]['rate'] == 8e-3
  assert by[(144, 2)]['rate'] == 4e-3 and not by[(144, 2)]['clamped']  # 3.6e-3 fitted: the swept rate nearest it
  assert by[(144, 2)]['cost'] == pytest.approx(0.004 * np.log2(4e-3 / by[(144, 2)]['fitted']) ** 2)
  _, single = summaries.lr_rows({'LR': [r for r in grid if r['model.model_dim'] == 64]})
  assert not any('rule' in r for r in single)  # one width: no slope to fit (the tiny scale's table is unchanged)
  flat = [dict(r, loss_mean=1.4, seed_losses={'0/0': 1.4 + 1e-4 * (i % 3)}) for i, r in enumerate(grid)]
  rates, rows = summaries.lr_rows({'LR': flat})  # bowls with no curvature: the table says why there is no rule
  assert 'No rate rule between the widths: grid LR\'s bowls are flat' in render.lr_table(rates, rows)


def _bowls(optimum, widths=(64, 96, 144), topks=(2, 8), lrs=(2e-3, 4e-3, 8e-3, 1.6e-2), curvature=0.004, noise=0.0,
           seed=0):
  rng = np.random.default_rng(seed)
  return [{'width': d, 'topk': k, 'lr': lr, 'loss': 1.4 + curvature * np.log2(lr / optimum(d, k)) ** 2
           + rng.normal(0, noise)} for d in widths for k in topks for lr in lrs]


def test_the_rate_rule_refuses_grids_that_cannot_identify_it():
  """A DataError, not a number: each top-k class at one width only (slope confounded with the classes' optima), and
  bowls flat within the noise (curvature not 2 standard errors above 0: the rule would be noise)."""
  from moejax.studies import summaries  # pylint: disable=import-outside-toplevel
  confounded = [p for p in _bowls(lambda d, k: 8e-3 * 64 / d) if (p['width'], p['topk']) in ((64, 2), (144, 8))]
  with pytest.raises(DataError, match='no top-k class at two widths'):
    summaries.lr_rule(confounded)
  with pytest.raises(DataError, match='flat within the noise'):
    summaries.lr_rule(_bowls(lambda d, k: 8e-3, curvature=0.0, noise=0.004))
  rule = summaries.lr_rule(_bowls(lambda d, k: 8e-3 * 64 / d, noise=0.001))
  assert rule['curvature'] > 2 * rule['curvature_se'] and abs(rule['slope'] + 1) < 2 * rule['slope_se'] + 0.1


def test_the_rate_rule_flags_an_optimum_outside_the_sweep_and_maps_top_k_as_papers_does():
  """An optimum a factor 4 below d=144's sweep is clamped and flagged (extend the sweep), per width: d=64's sweep
  is not d=144's; k=4 takes the k=2 class and k=5 the k=8 class, as papers.lr_for does."""
  from moejax.studies import summaries  # pylint: disable=import-outside-toplevel
  optimum = lambda d, k: (8e-3 if k == 2 else 4e-3) * (64 / d) ** 3  # noqa: E731  (d=144: 7e-4 and 3.5e-4)
  points = [p for p in _bowls(optimum, lrs=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2))
            if p['width'] < 144 or p['lr'] <= 8e-3 and p['lr'] >= 1e-3]
  rule = summaries.lr_rule(points)
  low = rule['choose'](144, 8)
  assert low['rate'] == 1e-3 and low['clamped'] and low['fitted'] == pytest.approx(4e-3 * (64 / 144) ** 3, rel=0.05)
  assert not rule['choose'](64, 2)['clamped'] and rule['choose'](64, 2)['rate'] == 8e-3
  assert rule['fitted'](96, 4) == rule['fitted'](96, 2) and rule['fitted'](96, 5) == rule['fitted'](96, 8)


def test_the_noise_line_says_when_the_paired_sigma_is_too_thin_to_use():
  """tiny2's default class: the paired σ from the four configurations at seeds {0, 1} has 3 degrees of freedom, so
  the pooled σ decides, and the page says so; with 6 or more it is used and nothing is added."""
  thin = {'default': {'configurations': 7, 'sigma': 0.0114, 'dof': 16, 'paired_sigma': 0.0076, 'paired_dof': 3}}
  line = render.noise_classes(thin)
  assert line == ('**default** (7 configurations): paired σ = 0.0076 nats (3 degrees of freedom) (too few to use: '
                  'the pooled σ decides), pooled σ = 0.0114 nats (16 degrees of freedom)')
  assert 'too few' not in render.noise_classes({'default': dict(thin['default'], paired_dof=6)})
  assert 'paired σ = -,' in render.noise_classes({'default': dict(thin['default'], paired_sigma=None, paired_dof=0)})

