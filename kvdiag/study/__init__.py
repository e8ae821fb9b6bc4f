"""Reproducing arXiv 2604.08426: what runs (`configs`: the quick / gpu configurations, YAML files, the
study's method configurations), the pipeline (`reproduce`), paired bootstrap statistics (`paired`),
the claims' decision rules (`claims`), report.md (`report`) and findings.json with re-scoring
(`findings`); and head-wise budgets against their base at equal fetched bytes (`headwise`)."""
