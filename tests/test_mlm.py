"""Masked language modelling: BERT's masking, the same under every data split, and a model that learns.

Layout parity (tp x pp against one process) is in test_parallel_parity.py (case mlm-tp2-pp2).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from distlm.config import ConfigError, ModelConfig, load_config, validate
from distlm.data.masking import IGNORE_INDEX, MLMMasking, mask_id_for, model_vocab_for_mlm
from distlm.data.stream import TokenStream
from distlm.model import Transformer
from helpers import ROOT

CHAR = {"name": "char", "vocab_size": 66, "eos_id": 65}


def _masking(prob: float = 0.15, seed: int = 7) -> MLMMasking:
    return MLMMasking.for_tokenizer(CHAR, 66, prob, seed)


def test_bert_proportions_and_targets():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65, size=(400, 256))
    tokens[:, ::17] = 65  # document boundaries
    inputs, targets = _masking().apply(tokens, np.arange(400))
    chosen = targets != IGNORE_INDEX
    ordinary = tokens != 65
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.005
    assert not chosen[~ordinary].any(), "an EOS (document boundary) was chosen for prediction"
    assert (targets[chosen] == tokens[chosen]).all()  # the targets are the original tokens
    assert (inputs[~chosen] == tokens[~chosen]).all()  # nothing else is touched
    masked = inputs[chosen] == 66
    kept = inputs[chosen] == tokens[chosen]
    replaced = ~masked & ~kept
    n = chosen.sum()
    # 80% -> mask id, 10% -> random (a random id equals the original 1 time in 64), 10% kept
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(kept.sum() / n - (0.1 + 0.1 / 64)) < 0.01
    assert abs(replaced.sum() / n - 0.1 * 63 / 64) < 0.01
    assert not np.isin(inputs[chosen][replaced], [65, 66]).any(), "a random replacement was a special id"


def test_mask_is_a_function_of_seed_and_row_position():
    tokens = np.random.default_rng(1).integers(0, 65, size=(8, 64))
    masking = _masking()
    a, ta = masking.apply(tokens, np.arange(100, 108))
    b, tb = masking.apply(tokens[3:5], np.arange(103, 105))
    assert np.array_equal(a[3:5], b) and np.array_equal(ta[3:5], tb)
    c, _ = masking.apply(tokens, np.arange(200, 208))
    assert not np.array_equal(a, c), "other rows must get other masks"
    d, _ = _masking(seed=8).apply(tokens, np.arange(100, 108))
    assert not np.array_equal(a, d), "another seed must give other masks"


def test_mask_id_of_tokenizers_without_one_is_an_added_id():
    assert mask_id_for(CHAR, 66) == 66 and model_vocab_for_mlm(CHAR, 66) == 67
    bpe = {"name": "hf", "vocab_size": 300, "eos_id": 0, "pad_id": 1, "mask_id": 2, "bos_id": 3}
    assert mask_id_for(bpe, 300) == 2 and model_vocab_for_mlm(bpe, 300) == 300
    masking = MLMMasking.for_tokenizer(bpe, 300)
    assert set(masking.never.tolist()) == {0, 1, 2, 3} and 2 not in masking.replacements


def test_stream_masks_rows_alike_however_the_batch_is_split(shakespeare_char):
    """dp=1 with micro-batches of 4 reads the rows dp=2 ranks read in 2s: the masks must agree."""
    def rows(dp_size: int, micro: int, batches: int):
        out = {}
        for rank in range(dp_size):
            stream = TokenStream(str(shakespeare_char), "train", micro_batch_size=micro, dp_rank=rank,
                                 dp_size=dp_size, seed=3)
            stream.masking = MLMMasking.for_manifest(stream.manifest, 0.15, 3)
            it = iter(stream)
            for b in range(batches):
                x, y, _ = next(it)
                for i in range(micro):  # the global position of row i of batch b on this rank
                    out[b * micro * dp_size + rank * micro + i] = (x[i], y[i])
        return out

    one, two = rows(1, 4, 2), rows(2, 2, 2)
    assert one.keys() == two.keys()
    for position in one:
        assert torch.equal(one[position][0], two[position][0]) and torch.equal(one[position][1], two[position][1])
    x, y = one[0]
    assert (y != IGNORE_INDEX).any() and (x == 66).any()  # masked, with the added mask id


def test_stream_masks_row_i_from_position_i(shakespeare_char):
    """In file order (validation, `distlm eval`) row i of the split is masked from position i:
    what `distlm eval` assumes when it masks a text file's row i itself."""
    masking = MLMMasking.for_tokenizer(CHAR, 66, 0.15, 3)
    plain = iter(TokenStream(str(shakespeare_char), "val", micro_batch_size=4, shuffle=False))
    masked = iter(TokenStream(str(shakespeare_char), "val", micro_batch_size=4, shuffle=False, masking=masking))
    for k in range(3):
        rows = next(plain).inputs.numpy()
        x, y, _ = next(masked)
        want_x, want_y = masking.apply(rows, np.arange(4 * k, 4 * k + 4))
        assert np.array_equal(x.numpy(), want_x) and np.array_equal(y.numpy(), want_y), k
        assert (y != IGNORE_INDEX).any()


def test_attention_is_bidirectional_for_mlm_only():
    """A later token changes an earlier position's output under mlm, never under clm."""
    tokens = torch.randint(0, 50, (1, 12))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 50
    for objective, sees_ahead in (("clm", False), ("mlm", True)):
        model = Transformer(ModelConfig(vocab_size=50, max_seq_len=12, n_layers=2, d_model=32, n_heads=4,
                                        objective=objective), seed=0).eval()
        with torch.no_grad():
            diff = (model(tokens)[0, 0] - model(changed)[0, 0]).abs().max().item()
        assert (diff > 1e-4) == sees_ahead, (objective, diff)


def test_mask_prob_is_checked():
    cfg = load_config(ROOT / "configs" / "tiny-test.yaml", ["model.objective=mlm", "model.mask_prob=0"])
    with pytest.raises(ConfigError, match="model.mask_prob"):
        validate(cfg, 1)


def _unigram_entropy(text: str) -> float:
    counts = Counter(text)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_mlm_training_beats_the_unigram_entropy(shakespeare_char):
    """A small bidirectional model predicts masked characters far better than their frequencies.

    The unigram entropy (about 3.3 nats) is the best a model that ignores the context can do.
    Rotary positions: with learned ones a model this small sits at that entropy for hundreds of
    steps before it learns to read its neighbours. (The training loop itself runs masked LM in
    test_parallel_parity.py; here the stream and the model, in-process, to keep it quick.)
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = TokenStream(str(shakespeare_char), "train", micro_batch_size=32, seed=1)
        train.masking = MLMMasking.for_manifest(train.manifest, 0.15, 1)
        val = TokenStream(str(shakespeare_char), "val", micro_batch_size=256, shuffle=False)
        val.masking = MLMMasking.for_manifest(val.manifest, 0.15, 1)
        model = Transformer(ModelConfig(vocab_size=67, max_seq_len=64, n_layers=2, d_model=64, n_heads=4,
                                        pos="rope", objective="mlm"), seed=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batches = iter(train)
        for _ in range(400):
            x, y, _ = next(batches)
            loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            x, y, _ = next(iter(val))
            val_loss = model.eval()(x, y).item()
    finally:
        torch.set_num_threads(threads)
    entropy = _unigram_entropy((ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text())
    print(f"masked val loss {val_loss:.3f} nats vs unigram entropy {entropy:.3f}")
    assert val_loss < entropy - 0.5, (val_loss, entropy)
