"""Training: augmentation and a short, deterministic smoke run on digits."""

import dataclasses

import torch

from hiercluster.run.config import TrainConfig
from hiercluster.data.datasets import load_dataset, make_loader
from hiercluster.evaluation.inference import accuracy, collect_logits
from hiercluster.models.zoo import build_model
from hiercluster.run.train import augment_batch


def test_augment_crop_is_a_shift_and_flip_mirrors():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, 0, False, gen), x)
    out = augment_batch(x, 1, False, gen)
    assert out.shape == x.shape
    # With replicate padding, every output pixel is some input pixel of the same image.
    for i in range(2):
        assert set(out[i].flatten().tolist()) <= set(x[i].flatten().tolist())
    flipped = augment_batch(x, 0, True, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def _train_digits(seed):
    from hiercluster.run.train import train_model

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    torch.manual_seed(seed)
    model = build_model("resnet8", 10, 1, width=8)
    cfg = dataclasses.replace(TrainConfig(), epochs=4, batch_size=64, lr=0.05, crop_padding=1, hflip=False, seed=seed)
    history = train_model(model, train, cfg, progress=False)
    return model, history, accuracy(*collect_logits(model, make_loader(test, 256)))


def test_training_smoke_is_deterministic_and_learns():
    model_a, hist_a, acc_a = _train_digits(0)
    model_b, hist_b, acc_b = _train_digits(0)
    assert hist_a["loss"] == hist_b["loss"] and acc_a == acc_b
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), k
    assert hist_a["loss"][-1] < hist_a["loss"][0]
    assert acc_a > 0.6  # chance is 0.1; 4 epochs of resnet8 on digits reach ~0.9
