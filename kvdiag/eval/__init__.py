"""Task evaluation: the harness (`harness.run_eval`), its resumable store (`store`), what a later run
may add to a run directory (`resume`), input parsing (`inputs`), teacher-forced fidelity
(`fidelity`) and the `kvdiag heads` pipeline (`heads`: per-head context intensity of a task's
teacher-forced answers vs the needle task)."""
