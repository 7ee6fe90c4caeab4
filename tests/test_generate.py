"""`distlm generate`: the KV cache gives the same tokens and logits as recomputing, sampling
options and seeds behave, the CLI end to end, and a masked LM is refused."""

from __future__ import annotations

import argparse

import pytest
import torch

from distlm.config import ConfigError, ModelConfig
from distlm.model import Transformer
from distlm.tasks.generate import KVCache, check_sampling, filter_logits, generate

from helpers import run_distlm

VOCAB, SEQ = 37, 24

# Each differs from the default (learned positions, tied head, multi-head) in one way or more.
VARIANTS = {
    "learned": {},
    "sinusoidal": {"pos": "sinusoidal"},
    "rope-gqa-untied": {"pos": "rope", "n_kv_heads": 2, "tie_embeddings": False, "norm": "rmsnorm", "mlp": "swiglu"},
    "rope-mqa": {"pos": "rope", "n_kv_heads": 1, "bias": True},
}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: extra intra-op threads only add contention (seconds per test on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(dtype=torch.float64, **overrides) -> Transformer:
    """A small random model with peaked logits (large init), so greedy picks are never near-ties."""
    cfg = dict(vocab_size=VOCAB, max_seq_len=SEQ, n_layers=2, d_model=32, n_heads=4, d_ff=64, init_std=0.3)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg), seed=3).to(dtype).eval()


def prompt(T: int = 5, B: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def collect_logits(model, ids, steps: int, use_cache: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    seen = []
    out = generate(model, ids, steps, temperature=0, use_cache=use_cache,
                   on_logits=lambda step, logits: seen.append(logits.clone()))
    return out, seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_matches_recompute_past_the_window(variant):
    # 5 prompt tokens + 40 new ones run 21 tokens past max_seq_len=24: the sliding window.
    model = random_model(**VARIANTS[variant])
    ids = prompt(5, B=2)
    cached, cached_logits = collect_logits(model, ids, 40, use_cache=True)
    full, full_logits = collect_logits(model, ids, 40, use_cache=False)
    assert cached.shape == (2, 40)
    assert torch.equal(cached, full)
    for step, (a, b) in enumerate(zip(cached_logits, full_logits)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"step {step}: {m}")


def test_prompt_longer_than_the_window_is_cropped():
    model = random_model(pos="sinusoidal")
    ids = prompt(SEQ + 10)
    notes = []
    cached = generate(model, ids, 8, temperature=0, log=notes.append)
    assert torch.equal(cached, generate(model, ids, 8, temperature=0, use_cache=False))
    assert torch.equal(cached, generate(model, ids[:, -SEQ:], 8, temperature=0, use_cache=False))
    assert len(notes) == 1 and f"max_seq_len={SEQ}" in notes[0]


def test_cached_logits_equal_a_plain_forward_in_float32():
    # The cache against the model's own forward on the same prefix: what training computes.
    model = random_model(torch.float32, pos="rope", n_kv_heads=2)
    ids = prompt(6)
    cached, logits = collect_logits(model, ids, 15, use_cache=True)
    sequence = torch.cat([ids, cached], dim=1)
    with torch.no_grad():
        for step, got in enumerate(logits):
            context = sequence[:, : 6 + step][:, -SEQ:]
            torch.testing.assert_close(got, model(context)[:, -1], rtol=1e-4, atol=1e-4)


def test_chunked_prefill_sees_the_cached_tokens():
    # Several new tokens over a non-empty cache need a causal mask aligned to the last keys.
    model = random_model(pos="rope", n_kv_heads=2)
    ids = prompt(12)
    cache = KVCache(model, batch_size=1)
    with torch.no_grad():
        model.features(ids[:, :5], cache=cache)
        tail = model(ids[:, 5:], cache=cache)
        torch.testing.assert_close(tail, model(ids)[:, 5:], rtol=1e-9, atol=1e-9)
    assert cache.length == 12


def test_char_checkpoint_greedy_with_and_without_cache(char_checkpoint):
    from distlm.checkpoint.pretrained import load_pretrained

    loaded = load_pretrained(char_checkpoint, log=lambda *_: None)
    model = loaded.model
    assert model.cfg.max_seq_len == 64
    ids = torch.as_tensor(loaded.tokenizer().encode("ROMEO:"), dtype=torch.long)
    notes = []
    cached = generate(model, ids, 100, temperature=0, log=notes.append)  # 106 tokens: past the window
    full = generate(model, ids, 100, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    assert len(notes) == 1 and "max_seq_len=64" in notes[0]


def test_seeds_top_k_and_top_p():
    model = random_model(torch.float32, init_std=0.05)  # flat logits: samples differ by seed
    ids = prompt(4)

    def sample(seed, **options):
        return generate(model, ids, 30, generator=torch.Generator().manual_seed(seed), **options)

    first = sample(1, temperature=1.0)
    assert torch.equal(first, sample(1, temperature=1.0))
    assert not torch.equal(first, sample(2, temperature=1.0))
    greedy = generate(model, ids, 30, temperature=0)
    assert torch.equal(sample(5, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(6, temperature=1.0, top_p=1e-6), greedy)
    # Cached or not, the same seed draws the same tokens.
    assert torch.equal(sample(1, temperature=1.0, use_cache=False), first)


def test_filter_logits_keeps_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03 .01
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, 1.0, top_p=0.5)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, 1.0, top_p=0.8)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, 1.0, top_p=0.95)) == [True, True, True, False, False]
    assert kept(filter_logits(logits, 1.0, top_k=3, top_p=1.0)) == [True, True, True, False, False]
    # Unsorted rows, each filtered on its own; the kept logits are the scaled ones.
    rows = torch.tensor([[0.0, 2.0, 1.0, 3.0], [3.0, 0.0, 1.0, 2.0]])
    out = filter_logits(rows, 0.5, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, False, True]]
    torch.testing.assert_close(out[torch.isfinite(out)], torch.tensor([4.0, 6.0, 6.0, 4.0]))
    # Ties: four tokens of 1/4 each. Exactly 0.5 is reached by two of them; a bit more needs a third.
    flat = torch.zeros(1, 4)
    assert torch.isfinite(filter_logits(flat, 1.0, top_p=0.5)).sum() == 2
    assert torch.isfinite(filter_logits(flat, 1.0, top_p=0.51)).sum() == 3
    # top-p after top-k: the nucleus is taken in the renormalized top-k distribution.
    assert kept(filter_logits(logits, 1.0, top_k=2, top_p=0.7)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, 1.0, top_k=2, top_p=0.75)) == [True, True, False, False, False]


def test_padded_vocabulary_ids_are_never_drawn():
    # A model whose table is padded past its tokenizer's ids: those rows decode to nothing.
    model = random_model(torch.float32, init_std=0.05)
    ids = prompt(4, B=3)
    limit = 10
    for options in ({"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 0}):
        out = generate(model, ids, 30, generator=torch.Generator().manual_seed(0), vocab_size=limit, **options)
        assert out.shape == (3, 30) and int(out.max()) < limit, options
    free = generate(model, ids, 30, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert int(free.max()) >= limit  # without the limit they are drawn: the check above is not vacuous
    with pytest.raises(ValueError, match="outside|0..36"):
        generate(model, torch.tensor([[1, VOCAB]]), 3)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, ids, 3, vocab_size=VOCAB + 1)


@pytest.mark.parametrize("settings, flag", [
    ({"temperature": -0.1}, "--temperature"), ({"top_k": 0}, "--top-k"), ({"top_p": 0.0}, "--top-p"),
    ({"top_p": 1.5}, "--top-p"), ({"max_new_tokens": 0}, "--max-new-tokens"),
])
def test_bad_settings_name_their_flag(settings, flag):
    values = {"max_new_tokens": 10, "temperature": 1.0, "top_k": None, "top_p": 1.0, **settings}
    with pytest.raises(ConfigError, match=flag):
        check_sampling(**values)


def test_masked_lm_is_refused():
    model = random_model(objective="mlm")
    with pytest.raises(ConfigError, match="left to right.*clm"):
        generate(model, prompt(3), 5)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_padding_is_never_attended_to(objective):
    # cache=None is the training and scoring path; `keep` hides a right-padded row's tail, so its
    # real positions come out as they do without the padding (under mlm they would see it otherwise).
    model = random_model(torch.float64, objective=objective)
    ids = prompt(SEQ, B=2)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1, 20:] = False
    with torch.no_grad():
        padded = model.features(ids, keep)
        torch.testing.assert_close(padded[1, :20], model.features(ids[1:, :20])[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(padded[0], model.features(ids[:1])[0], rtol=1e-9, atol=1e-9)
        assert torch.isfinite(padded).all()
        if objective == "mlm":  # the test can fail: without the mask the padding changes the real positions
            assert not torch.allclose(model.features(ids)[1, :20], padded[1, :20])


def test_cli_end_to_end(char_checkpoint, tmp_path):
    out = run_distlm(["generate", str(char_checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "100",
                      "--seed", "1"], timeout=120)
    stdout = out.stdout
    assert "step 300" in stdout and "tokens/s" in stdout  # the stderr notes (merged by run_distlm)
    # The text comes last: the prompt, then 100 characters (one per token, EOS as a line break), then print's newline.
    generated = stdout[stdout.index("ROMEO:") + len("ROMEO:"):]
    assert generated.endswith("\n")
    generated = generated[:-1]
    assert len(generated) == 100, generated
    letters = sum(c.isalpha() or c.isspace() for c in generated)
    assert letters / len(generated) > 0.8, generated

    bad = run_distlm(["generate", str(char_checkpoint), "--prompt", "x", "--top-p", "0"], check=False, timeout=60)
    assert bad.returncode == 2 and "--top-p" in bad.stdout, bad.stdout
    missing = run_distlm(["generate", str(tmp_path / "nothing"), "--prompt", "x"], check=False, timeout=60)
    assert missing.returncode == 4 and "no such checkpoint" in missing.stdout, missing.stdout


def test_cli_refuses_a_wrong_tokenizer_or_device(char_checkpoint, tmp_path, capsys):
    from distlm.cli import main
    from distlm.data.tokenizers import ByteTokenizer

    wide = tmp_path / "byte.json"
    ByteTokenizer().save(wide)  # 257 ids for a model of 66: its ids would index past the table
    assert main(["generate", str(char_checkpoint), "--prompt", "x", "--tokenizer", str(wide), "--device", "cpu"]) == 2
    assert "257 ids but the model only 66" in capsys.readouterr().err
    assert main(["generate", str(char_checkpoint), "--prompt", "x", "--device", "gpu0"]) == 2
    assert "--device gpu0" in capsys.readouterr().err


def test_cli_json_and_empty_prompt(char_checkpoint, capsys):
    import json

    from distlm.cli import build_parser
    from distlm.tasks.generate import run

    args = build_parser().parse_args(["generate", str(char_checkpoint), "--prompt", "", "--max-new-tokens", "20",
                                      "--num-samples", "2", "--json", "--device", "cpu"])
    assert isinstance(args, argparse.Namespace)
    assert run(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample"] for r in rows] == [0, 1]
    assert all(r["num_tokens"] == 20 and len(r["tokens"]) == 20 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["tokens"] != rows[1]["tokens"]
