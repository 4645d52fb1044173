"""The shipped default baseline: loads safely and reaches its promised accuracy."""

import json
from pathlib import Path

from hiercluster.data.datasets import load_dataset, make_loader
from hiercluster.evaluation.inference import accuracy, collect_logits
from hiercluster.models.zoo import count_parameters, load_checkpoint

CHECKPOINT = Path(__file__).resolve().parents[3] / "data" / "checkpoints" / "fashion_mnist_resnet20.pt"


def test_shipped_checkpoint_accuracy():
    model, meta = load_checkpoint(CHECKPOINT)
    assert count_parameters(model) < 1_000_000
    test_set = load_dataset("fashion_mnist", split="test")
    acc = accuracy(*collect_logits(model, make_loader(test_set, 128)))
    assert acc >= 0.92  # the floor for the default baseline
    recorded = json.loads(CHECKPOINT.with_suffix(".json").read_text())["test_accuracy"]
    # Evaluation is deterministic: the metadata is what we measure (recorded as a float32 mean, hence 1e-6).
    assert abs(acc - recorded) < 1e-6
