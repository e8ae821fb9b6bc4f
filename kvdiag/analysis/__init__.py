"""Analyses of a captured Trace: key spectra (`spectrum`), low-rank damage (`lowrank`), recall
with the output-error decomposition of every method (`recall`), and per-head context intensity with
need-proportional budgets (`heads`)."""
