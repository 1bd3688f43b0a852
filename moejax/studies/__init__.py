"""Studies: from result.json files to verdicts, fits, figures and reports, plus the design search and sweeps.

  results     gather result.json files into rows (seeds grouped)
  grids       rows matched to the paper grids; the noise rows; the default-design rows the laws are fitted to
  statistics  t quantiles, pooled and block-design noise, the noise check, argmin intervals, Holm
  verdicts    the Claim row and the directional, trend and small-effect rules
  claims      the papers' claims (docs/reproducing-the-papers.md)
  fits        scaling-law forms, their fits and baselines (docs/reproducing-the-papers.md)
  summaries   speedup over dense, the learning-rate sweep, compute, the literature's side
  render      every Markdown table, from rows (render_frontier: the frontier's)
  figures     the PNGs, from rows
  report      gather -> evaluate -> write claims.md, report.md and the figures
  design      the design search (docs/studies.md)
  frontier    compute-matched frontiers: designs that hold one cost fixed at several budgets (docs/studies.md §11)
  frontier_analysis  a frontier's optimum per budget with intervals, and how it moves
  render_frontier    the frontier's Markdown
  sweeps      sweep bookkeeping (run, skip, fail, cluster scripts)
  routes      routing replayed over a run's kept checkpoints: specialisation, stability, dead experts

Imports only go down this list's dependency order (no module imports one that imports it back).
"""
