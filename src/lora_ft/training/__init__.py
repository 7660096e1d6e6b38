"""Training: the engine (``trainer.Trainer``), its loop state, evaluation, checkpoints, scale-out, the guards the
loop consults (best adapter, overfitting watch, forgetting guard), the craft switches and the reports."""
