"""The power plan's Markdown (`python -m moejax.claims --plan`, and beside the verdicts in `claims.md`), rendered
from `moejax.studies.plan.Plan` rows like every other table (`render.py`)."""

from __future__ import annotations

from moejax.model import accounting
from moejax.studies import statistics, verdicts
from moejax.studies.verdicts import Claim


def plan_markdown(plan, claims: list[Claim] | None = None, pilot: tuple[str, list[Claim]] | None = None) -> str:
  """The power plan (`moejax.studies.plan.Plan`) as Markdown; with `claims`, each claim's verdict beside it, and
  with `pilot` ((scale, claims)) the verdict the pilot's own runs gave (fit claims are not refitted: '-')."""
  budget = f'{plan.budget / 3600:.3g} h of training wall time' if plan.unit == 's' else f'{plan.budget:.3g} FLOPs'
  used = f'{plan.hours:.2f} h' if plan.unit == 's' else f'{plan.flops:.3g} FLOPs'
  now = {verdicts.plan_key(c): c.verdict for c in claims or []}
  before = {verdicts.plan_key(c): c.verdict for c in (pilot or ('', []))[1] if c.kind != 'fit'}
  lines = [f'## Power plan (budget {budget})', '',
           f'Seeds per point and run length for {statistics.POWER:.0%} power on every claim, from the pilot runs\' '
           'noise per class and recorded wall time per token (moejax/studies/plan.py; effects of interest and their '
           f'sources: experiments/papers.py `EFFECT_OF_INTEREST`). Chosen run length: {plan.factor:g}x the pilot\'s, '
           f'{plan.steps} steps, {accounting.human(plan.tokens)} tokens per run; the plan spends {used} '
           f'({plan.hours:.2f} h at the pilot\'s recorded speed{plan.price_note()}, {plan.flops:.3g} training FLOPs). "cost" is a claim\'s '
           'runs on their own; configurations shared by chosen claims run once, at the most seeds any asks. "Pilot\'s '
           'effect" is how it changed between the pilot\'s last two budgets: where it still "shrinks", an effect of '
           'interest taken from it is likely too large for a longer run, and the power optimistic.', '',
           '| claim | rule | effect of interest (nats) | source | pilot\'s effect | noise class | σ assumed | seeds per '
           'point | points | runs | cost (h) | cost (FLOPs) | power | in the plan |' + (' verdict now |' if claims else '')
           + (f' verdict of the pilot (`{pilot[0]}`) |' if pilot else ''),
           '|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|' + ('---|' if claims else '')
           + ('---|' if pilot else '')]
  fmt = lambda x, f: '-' if x is None else format(x, f)
  for r in plan.rows:
    inside = 'yes' if r.decidable else f'**no**: {r.note}'
    lines.append(f'| {r.key} | {r.kind} | {fmt(r.effect, ".3g")} | {r.source} | {r.pilot_trend} | {r.noise_class} | '
                 f'{fmt(r.sigma, ".4f")} | {fmt(r.seeds, "d")} | {r.points} | {r.runs} | {fmt(r.hours, ".2f")} | '
                 f'{fmt(r.flops, ".3g")} | {fmt(r.power, ".2f")} | {inside} |'
                 + (f' {now.get(r.key, "-")} |' if claims else '') + (f' {before.get(r.key, "-")} |' if pilot else ''))
  out = [r.key for r in plan.rows if not r.decidable]
  chosen = next(t for t in plan.lengths if t['factor'] == plan.factor)
  every = (f'{chosen["all_hours"]:.3g} h' if plan.unit == 's' else f'{chosen["all_flops"]:.3g} FLOPs')
  lines += ['', f'Not decidable within this budget: {", ".join(out) or "none"}. Deciding every claim that some seed '
            f'count decides ({chosen["plannable"]} of {len(plan.rows)}) at this length would need {every}.', '',
            'Run lengths tried (noise beyond the pilot\'s length is assumed equal to the pilot\'s full-length noise):',
            '', '| length | tokens per run | claims decided | wall time (h) | training FLOPs |', '|---:|---:|---:|---:|---:|']
  for t in plan.lengths:
    lines.append(f'| {t["factor"]:g}x | {accounting.human(t["tokens"])} | {t["decided"]} | {t["hours"]:.2f} | '
                 f'{t["flops"]:.3g} |')
  fractions = sorted({f for by in plan.noise.values() for f in by})
  lines += ['', 'Seed σ per noise class at each fraction of the pilot\'s run (decay branches; paired where the class '
            'has a block design):', '', '| class | ' + ' | '.join(f'{f:g}' for f in fractions) + ' |',
            '|---|' + '---:|' * len(fractions)]
  for name, by in plan.noise.items():
    lines.append(f'| {name} | ' + ' | '.join(f'{by[f][0]:.4f}' if f in by else '-' for f in fractions) + ' |')
  lines += ['', 'Seeds per configuration in the plan: ' + (', '.join(f'{k} {v}' for k, v in plan.seeds.items())
                                                          or 'none') + '.', '']
  return '\n'.join(lines)
