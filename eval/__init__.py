"""Consistency and accuracy evaluation of pruned bundles against the unpruned model (`make eval`).

pope (questions) ─► run (bundles, resumable cache) ─► metrics ─► report (json/csv/md/png)
"""
