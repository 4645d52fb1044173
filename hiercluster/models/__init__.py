"""Models: architectures by name, checkpoints read without pickle, and the classifier layer."""
