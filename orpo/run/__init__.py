"""A training run: checked and loaded (setup.py), decided once (plan.py), trained (trainer.py: ORPOTrainer),
finished (finish.py), in a process its launcher started (launch.py)."""
