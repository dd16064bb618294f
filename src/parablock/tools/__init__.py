"""Tools around runs: compare, report (plots), estimate (timing model), progress, generate."""
