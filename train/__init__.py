"""Training: `python -m train`. The loop (train.loop) does not know which loader feeds it."""
