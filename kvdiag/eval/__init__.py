"""Task evaluation: the harness (`harness.run_eval`), its resumable store (`store`), what a later run
may add to a run directory (`resume`), input parsing (`inputs`) and teacher-forced fidelity
(`fidelity`)."""
