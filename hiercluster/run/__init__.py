"""The run layer: config, run directory, pipeline, results store, executors, export and training."""
