"""Learning-rate schedules: cosine and warmup-stable-decay."""

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.train import optim
from moejax.errors import ConfigError


def _lr(cfg, steps):
  sched = optim.schedule(cfg.optim, steps)
  return np.array([float(sched(i)) for i in range(steps + 1)])


def test_wsd_holds_the_peak_then_decays_linearly(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'optim.schedule': 'wsd', 'optim.warmup_fraction': 0.1,
                                              'optim.decay_fraction': 0.2, 'optim.peak_learning_rate': 1e-3,
                                              'optim.final_lr_fraction': 0.1})
  lr = _lr(cfg, 100)
  assert lr[0] == 0.0 and lr[5] == pytest.approx(5e-4) and lr[10] == pytest.approx(1e-3)
  np.testing.assert_allclose(lr[10:81], 1e-3, rtol=1e-6)  # stable phase
  assert lr[90] == pytest.approx(0.55e-3) and lr[100] == pytest.approx(1e-4)
  assert (np.diff(lr[80:]) < 0).all()
  # the stable phase does not depend on the run's length: a longer run shares it
  longer = _lr(config_lib.apply_overrides(cfg, {'optim.warmup_fraction': 0.05}), 200)
  np.testing.assert_allclose(longer[10:81], lr[10:81], rtol=1e-6)


def test_cosine_is_the_default_and_bad_schedules_are_refused(tiny_cfg):
  lr = _lr(tiny_cfg, 100)
  assert tiny_cfg.optim.schedule == 'cosine' and lr[-1] == pytest.approx(
      tiny_cfg.optim.peak_learning_rate * tiny_cfg.optim.final_lr_fraction)
  with pytest.raises(ConfigError, match='optim.schedule'):
    config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'optim.schedule': 'linear'}))
  with pytest.raises(ConfigError, match='optim.decay_fraction'):
    config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'optim.decay_fraction': 0.99}))


def test_decay_branch_schedule_shares_warmup_and_stable_phase(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'optim.schedule': 'wsd', 'optim.warmup_fraction': 0.1,
                                              'optim.decay_fraction': 0.2, 'optim.peak_learning_rate': 1e-3,
                                              'optim.final_lr_fraction': 0.1, 'optim.decay_branches': '0.5,0.25'})
  main = optim.learning_rates(cfg.optim, 100)
  np.testing.assert_allclose(main, _lr(cfg, 100)[:100], rtol=1e-6)
  assert optim.branch_ends(cfg.optim, 100) == [25, 50]
  branch = optim.learning_rates(cfg.optim, 100, end=50)
  assert branch.shape == (50,) and optim.decay_start(cfg.optim, 50) == 40
  np.testing.assert_allclose(branch[:40], main[:40], rtol=1e-6)  # warmup and stable phase of the main run
  assert branch[40] == pytest.approx(1e-3) and branch[45] == pytest.approx(0.55e-3)
  assert (np.diff(branch[40:]) < 0).all()


@pytest.mark.parametrize('overrides,message', [
    ({'optim.decay_branches': '0.5'}, 'needs optim.schedule=wsd'),
    ({'optim.schedule': 'wsd', 'optim.decay_branches': '1.5'}, 'must be in \\(0, 1\\)'),
    ({'optim.schedule': 'wsd', 'optim.decay_branches': 'half'}, 'comma-separated fractions'),
    ({'optim.schedule': 'wsd', 'optim.warmup_fraction': 0.3, 'optim.decay_branches': '0.3'}, 'before warmup ends'),
    ({'optim.schedule': 'wsd', 'optim.warmup_fraction': 0.0, 'optim.decay_fraction': 0.001,
      'optim.decay_branches': '0.5'}, 'has no decay steps'),
])
def test_bad_decay_branches_are_one_line_errors(tiny_cfg, overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'train.steps': 100, **overrides}))
