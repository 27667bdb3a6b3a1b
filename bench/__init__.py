"""`python -m bench`: loader throughput and epoch time, DALI vs the albumentations CPU loader."""
