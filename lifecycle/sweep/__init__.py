"""`lifecycle sweep <file>`: an Optuna or W&B sweep whose every trial is a normal stage run."""
