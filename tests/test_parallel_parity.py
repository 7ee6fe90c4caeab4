"""Every layout computes the same model as one process (tp, pp, dp each in {1, 2}; up to 8 ranks).

Each layout trains the same tiny Llama-style model (RoPE, SwiGLU, RMSNorm, grouped-query
attention, tied embeddings) for 10 steps in fp32 on real gloo processes (and, once, as a masked
LM), and must follow the
one-process loss and gradient norm within 1e-5 relative. Its final checkpoint, consolidated
and loaded into one plain process, must give the run's own validation loss and the reference's
logits. The table of largest differences is printed (``pytest -s``).
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from distlm.checkpoint.consolidate import load_one_process_model
from distlm.config import ModelConfig
from distlm.data.prepare import prepare_corpus
from distlm.data.stream import TokenStream
from distlm.data.blend import Source
from distlm.data.masking import masking_for
from distlm.model import Transformer
from helpers import ROOT, package_source_corpus, read_metrics, run_distlm, step_rows

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 10
BATCH, MICRO = 8, 2
EVAL_ITERS = 2
LLAMA = ["model.n_layers=4", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
         "model.pos=rope", "model.mlp=swiglu", "model.norm=rmsnorm", "model.tie_embeddings=true",
         "model.vocab_size=258"]  # the byte tokenizer's 257, rounded up so tp=2 divides it
GPT2 = ["model.n_layers=4", "model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.pos=learned",
        "model.mlp=gelu", "model.norm=layernorm", "model.bias=true", "model.tie_embeddings=false",
        "model.vocab_size=258"]
MATRIX = [(tp, pp, dp) for tp, pp, dp in itertools.product((1, 2), repeat=3) if (tp, pp, dp) != (1, 1, 1)]
# id -> (architecture, (tp, pp, dp), extra overrides): the whole matrix on a Llama-like model,
# then the other paths: ZeRO 2/3, activation checkpointing, sequence parallelism, a GPT-2-like
# model (learned positions, biases, LayerNorm, GELU, untied head).
CASES = {f"tp{t}-pp{p}-dp{d}": ("llama", (t, p, d), []) for t, p, d in MATRIX}
CASES.update({
    "tp2-dp2-zero2": ("llama", (2, 1, 2), ["parallel.zero_stage=2"]),
    "tp2-dp2-zero3": ("llama", (2, 1, 2), ["parallel.zero_stage=3"]),
    "tp2-pp2-recompute": ("llama", (2, 2, 1), ["parallel.activation_checkpointing=true"]),
    "tp2-dp2-recompute": ("llama", (2, 1, 2), ["parallel.activation_checkpointing=true"]),
    "gpt2-tp2-pp2-dp2": ("gpt2", (2, 2, 2), []),
    "gpt2-tp2-dp2-seqpar": ("gpt2", (2, 1, 2), ["parallel.sequence_parallel=true"]),
    "gpt2-tp2-pp2-seqpar": ("gpt2", (2, 2, 1), ["parallel.sequence_parallel=true"]),
    # masked LM: bidirectional attention, and every rank of a replica must mask its rows alike
    "mlm-tp2-pp2": ("mlm", (2, 2, 1), []),
})
# The byte tokenizer's 257 ids plus the added mask id: 258 again.
ARCH = {"llama": LLAMA, "gpt2": GPT2, "mlm": LLAMA + ["model.objective=mlm"]}
RESULTS: dict = {}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-corpus")
    out = root / "shards"
    prepare_corpus([str(package_source_corpus(root))], str(out), tokenizer="byte", seq_len=32, val_fraction=0.05,
                   block_rows=64, log=lambda *_: None)
    return out


def _train(data_dir, run_dir, arch, tp, pp, dp, extra=()) -> str:
    args = ["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data_dir}", f"run.dir={run_dir}",
            f"train.max_steps={STEPS}", "train.log_every=1", f"train.batch_size={BATCH}",
            f"train.micro_batch_size={MICRO}", f"optim.decay_steps={STEPS}", "optim.warmup_steps=2",
            f"train.eval_iters={EVAL_ITERS}", "train.resume=never", f"parallel.tp={tp}", f"parallel.pp={pp}",
            "parallel.zero_stage=1", *ARCH[arch], *extra]
    return run_distlm(args, nproc=tp * pp * dp, timeout=420).stdout


@pytest.fixture(scope="module")
def references(data_dir, tmp_path_factory):
    """The one-process run of each architecture, made when first needed."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"ref-{arch}")
            _train(data_dir, made[arch], arch, 1, 1, 1)
        return made[arch]
    return get


def _one_process_model(run_dir) -> Transformer:
    folder = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    return load_one_process_model(folder, lambda m: Transformer(ModelConfig(**m), seed=0)).eval()


def _val_rows(data_dir, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    stream = TokenStream([Source(str(data_dir))], "val", micro_batch_size=BATCH * EVAL_ITERS, dp_rank=0, dp_size=1,
                         seed=1234, shuffle=False, seq_len=32)
    stream.masking = masking_for("mlm" if arch == "mlm" else "clm", stream.manifest, 0.15, 1234, "val")
    inputs, targets, _ = next(iter(stream))
    return inputs, targets


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _cost_ratios(stdout: str) -> tuple[dict, tuple[float, float]]:
    """From the start-up report: measured/minimum bytes per category, and the memory ratio range."""
    bytes_ratio = {m[1]: float(m[2]) for m in re.finditer(r"^\s+(tp|dp|pp)\s+measured.*ratio\s+([\d.]+)x", stdout, re.M)}
    mem = re.search(r"measured/estimated weights\+optimizer over all \d+ ranks: ([\d.]+) \.\. ([\d.]+)", stdout)
    return bytes_ratio, (float(mem[1]), float(mem[2]))


@pytest.mark.parametrize("case", list(CASES))
def test_layout_follows_one_process(case, data_dir, references, tmp_path):
    arch, (tp, pp, dp), extra = CASES[case]
    reference = references(arch)
    run_dir = tmp_path / "run"
    stdout = _train(data_dir, run_dir, arch, tp, pp, dp, extra)
    ref, got = step_rows(reference), step_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    loss_diff = max(_rel(g["loss"], r["loss"]) for g, r in zip(got, ref))
    norm_diff = max(_rel(g["grad_norm"], r["grad_norm"]) for g, r in zip(got, ref))
    # the loss moved: the comparison is over a real trajectory, not 10 copies of one number
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.05

    inputs, targets = _val_rows(data_dir, arch)
    with torch.no_grad():
        mine, theirs = _one_process_model(run_dir), _one_process_model(reference)
        logits, ref_logits = mine(inputs), theirs(inputs)
        # The run's validation loss is the mean of its micro-batches' means: for a masked LM,
        # whose micro-batches hold different numbers of masked tokens, that is not the mean
        # over all the tokens at once.
        one_process_val = torch.stack([mine(i, t) for i, t in zip(inputs.split(MICRO), targets.split(MICRO))]).mean().item()
    run_val = next(r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r)
    logit_diff = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    bytes_ratio, (mem_low, mem_high) = _cost_ratios(stdout)
    RESULTS[case] = (loss_diff, norm_diff, logit_diff, _rel(one_process_val, run_val), bytes_ratio, (mem_low, mem_high))

    assert loss_diff < 1e-5, f"loss differs by {loss_diff:.2e} relative"
    assert norm_diff < 1e-5, f"gradient norm differs by {norm_diff:.2e} relative"
    assert logit_diff < 1e-5, f"logits of the consolidated checkpoint differ by {logit_diff:.2e}"
    # the checkpoint is the run's model: one process recomputes the run's own validation loss
    assert math.isclose(one_process_val, run_val, rel_tol=1e-5), (one_process_val, run_val)
    # the layout moves no more bytes than it must (10% slack), and the memory estimate holds
    expected = {name for name, size in (("tp", tp), ("pp", pp), ("dp", dp)) if size > 1}
    assert set(bytes_ratio) >= expected, stdout[-3000:]
    assert all(r <= 1.1 for r in bytes_ratio.values()), bytes_ratio
    assert 0.9 <= mem_low <= mem_high <= 1.1, (mem_low, mem_high)


def test_print_table():
    """Runs last in this module: the largest relative differences per layout."""
    if not RESULTS:
        pytest.skip("no layout ran")
    print("\n| layout | loss | grad norm | logits (one process) | val loss (one process vs run) "
          "| bytes measured/minimum | memory measured/estimate |")
    print("|---|---|---|---|---|---|---|")
    for case, (*diffs, bytes_ratio, mem) in RESULTS.items():
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in sorted(bytes_ratio.items())) or "-"
        print(f"| {case} | " + " | ".join(f"{d:.1e}" for d in diffs) + f" | {ratios} | {mem[0]:.3f}-{mem[1]:.3f} |")
