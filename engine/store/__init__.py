"""Storage: the data directory's atomic checkpoint and version stores (files.py), a fleet's Triton-layout model
repository (repository.py: the trainer's writes; follower.py: a replica's polls) and Triton's model
configuration (triton.py, also `python -m engine.store.triton`)."""
