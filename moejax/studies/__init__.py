"""Studies: sweeps' bookkeeping, results tables, statistics, verdicts, fits, the design search, reports, figures and routing analysis."""
