import math

import pytest

from distlm.config import OptimConfig
from distlm.train.schedule import learning_rate


def nanogpt_get_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    # nanoGPT train.py's get_lr, for comparison
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2500])
def test_cosine_matches_nanogpt(step):
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, decay="cosine", decay_steps=2000)
    assert learning_rate(step, optim, max_steps=5000) == pytest.approx(nanogpt_get_lr(step), rel=1e-12)


def test_linear_and_constant():
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear")
    assert learning_rate(0, lin, 10) == pytest.approx(1.0)
    assert learning_rate(5, lin, 10) == pytest.approx(0.5)
    assert learning_rate(10, lin, 10) == pytest.approx(0.0)
    const = OptimConfig(lr=0.3, warmup_steps=2, decay="constant")
    assert learning_rate(1, const, 10) < 0.3
    assert learning_rate(9, const, 10) == pytest.approx(0.3)


def test_decay_defaults_to_max_steps():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0)
    assert learning_rate(100, optim, max_steps=100) == pytest.approx(0.1)
    assert learning_rate(50, optim, max_steps=100) == pytest.approx(0.55)
