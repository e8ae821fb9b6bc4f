"""Task evaluation: the harness (`harness.run_eval`), its resumable store (`store`), input parsing
(`inputs`) and teacher-forced fidelity (`fidelity`)."""
