"""Analyses of a captured Trace: key spectra (`spectrum`), low-rank damage (`lowrank`), and recall
with the output-error decomposition of every method (`recall`)."""
