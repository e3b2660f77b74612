"""The active-learning loop: one round (`rounds`), the simulated loop (`simulation`), rounds whose labels
come from people (`annotated`), the query of any strategy (`query`), the run directory (`run_dir`), a query written
for annotators (`export`) and studies of variants x seeds (`study`). Import the modules themselves: this package imports nothing, so
that reading a run directory or a study never starts Ray."""
