"""``distlm export CKPT --format hf OUT``: transformers computes distlm's logits from the export.

Tiny GPT-2 and Llama style models with random weights are written the way a checkpoint holds them
(``model-stage00-tp00.pt`` + ``distlm.json``), exported, loaded with
``AutoModelForCausalLM.from_pretrained`` and compared logit for logit (fp32, <= 1e-5). The
acceptance test trains a Llama-style model with 4 real processes (tp=2, pp=2) and exports its
checkpoint through the CLI. Nothing reaches the network (HF_HUB_OFFLINE, local_files_only).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from distlm.checkpoint.consolidate import load_one_process_model, shard_file
from distlm.checkpoint.export import ExportError, _resolve_step_folder, export_hf
from distlm.cli import EXIT_EXPORT_ERROR, main
from distlm.config import ModelConfig
from distlm.data.prepare import prepare_corpus
from distlm.model import Transformer
from helpers import ROOT, package_source_corpus, run_distlm

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is first imported (it reads it then)
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

TOL = 1e-5
MAX_DIFF: dict[str, float] = {}  # case -> largest |logit difference| (printed by the last test)

BASE = dict(vocab_size=67, max_seq_len=24, n_layers=2, d_model=32, n_heads=4)
CASES = {
    "gpt2-tied-nobias": dict(norm="layernorm", pos="learned", mlp="gelu"),
    "gpt2-untied-bias": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=False,
                             d_ff=48, norm_eps=1e-6),
    "llama-gqa-tied": dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=2),
    "llama-gqa-untied-bias": dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=1, bias=True,
                                  tie_embeddings=False, d_ff=40, rope_theta=500.0, norm_eps=1e-6),
}


def _random_model(cfg: ModelConfig, seed: int) -> Transformer:
    """Weights far from the init (norm gains, biases too), so a wrong mapping cannot hide."""
    model = Transformer(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _write_checkpoint(folder: Path, model: Transformer, step: int = 8) -> Path:
    """A one-process checkpoint as a save commits it: the model file, distlm.json, the manifest."""
    from distlm.checkpoint.commit import commit
    from distlm.checkpoint.files import FileWriter, serialize
    from distlm.checkpoint.manifest import build

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True)
    writer = FileWriter(tmp, step)
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    writer.write(tmp / shard_file(0, 0), serialize({"tensors": tensors, "sliced_dim": {}, "tp_size": 1, "pp": 1,
                                                    "stage": 0, "tp_rank": 0}))
    writer.write(tmp / "distlm.json", json.dumps({"step": step, "config": {"model": asdict(model.cfg)}}).encode())
    writer.finish()
    return commit(tmp, build(step, writer.records, {}, {}))


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Change a file and re-sign it in the manifest (a checkpoint edited on purpose, not damaged)."""
    import hashlib

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _hf_model(out: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.float().eval()


def _max_diff(model: Transformer, hf, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape
    assert ours.std() > 0.5  # the logits are not near-constant: the comparison means something
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_export_gives_transformers_the_same_logits(case, tmp_path):
    cfg = ModelConfig(**BASE, **CASES[case])
    model = _random_model(cfg, seed=len(case))
    folder = _write_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000008", model)
    lines = []
    out = export_hf(folder, tmp_path / "hf", log=lines.append)

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "distlm_export.json", "model.safetensors"]
    assert any("model.safetensors" in line for line in lines)
    hf = _hf_model(out)
    expected = "GPT2LMHeadModel" if cfg.pos == "learned" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    assert (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight) == cfg.tie_embeddings
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    diff = _max_diff(model, hf, tokens)
    MAX_DIFF[case] = diff
    assert diff <= TOL, f"{case}: logits differ by {diff:.2e}"

    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert all(f.get_tensor(n).dtype == torch.float32 for n in names)
    assert ("lm_head.weight" in names) != cfg.tie_embeddings  # a tied table is written once
    note = json.loads((out / "distlm_export.json").read_text())
    assert note["source"] == {"checkpoint": "step-00000008", "step": 8}
    assert note["model"] == asdict(cfg)
    assert "tokenizer" not in note


def test_gpt2_activation_is_the_exact_gelu(tmp_path):
    """The tolerance would not notice a GELU mix-up at init scale; the config must say it outright."""
    cfg = ModelConfig(**BASE, **CASES["gpt2-tied-nobias"])
    folder = _write_checkpoint(tmp_path / "step-00000001", _random_model(cfg, 0), step=1)
    config = json.loads((export_hf(folder, tmp_path / "hf", log=lambda *_: None) / "config.json").read_text())
    assert config["activation_function"] == "gelu"
    assert config["n_positions"] == cfg.max_seq_len
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0


def test_checkpoint_resolves_from_a_step_a_checkpoints_or_a_run_folder(tmp_path):
    cfg = ModelConfig(**BASE, **CASES["llama-gqa-tied"])
    ckpts = tmp_path / "run" / "checkpoints"
    older = _write_checkpoint(ckpts / "step-00000004", _random_model(cfg, 1), step=4)
    newer = _write_checkpoint(ckpts / "step-00000008", _random_model(cfg, 2), step=8)
    (ckpts / "latest").write_text("step-00000008")
    assert _resolve_step_folder(older) == older
    assert _resolve_step_folder(ckpts) == newer
    assert _resolve_step_folder(tmp_path / "run") == newer
    note = json.loads((export_hf(tmp_path / "run", tmp_path / "hf", log=lambda *_: None)
                       / "distlm_export.json").read_text())
    assert note["source"]["step"] == 8


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("options, named", [
    (dict(norm="layernorm", pos="sinusoidal", mlp="gelu"), "model.pos=sinusoidal"),
    (dict(norm="layernorm", pos="rope", mlp="swiglu"), "model.norm=layernorm"),
    (dict(norm="rmsnorm", pos="learned", mlp="gelu"), "model.norm=rmsnorm"),
    (dict(norm="layernorm", pos="learned", mlp="gelu", n_kv_heads=2), "model.n_kv_heads=2"),
])
def test_a_model_without_a_transformers_counterpart_is_refused_by_name(options, named, tmp_path):
    cfg = ModelConfig(**BASE, **options)
    folder = _write_checkpoint(tmp_path / "step-00000001", _random_model(cfg, 0), step=1)
    with pytest.raises(ExportError, match="supported: GPT-2 style .* Llama style") as err:
        export_hf(folder, tmp_path / "hf", log=lambda *_: None)
    assert named in str(err.value)
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = ModelConfig(**BASE, **CASES["gpt2-tied-nobias"])
    folder = _write_checkpoint(tmp_path / "step-00000001", _random_model(cfg, 0), step=1)
    marker = json.loads((folder / "distlm.json").read_text())
    marker["config"]["model"]["vocab_size"] = 80
    _rewrite(folder, "distlm.json", json.dumps(marker).encode())
    with pytest.raises(ExportError, match=r"tok_emb\.weight is \[67, 32\], the config needs \[80, 32\]"):
        export_hf(folder, tmp_path / "hf", log=lambda *_: None)


def test_missing_incomplete_or_damaged_checkpoints_are_refused(tmp_path):
    with pytest.raises(ExportError, match="no such checkpoint"):
        export_hf(tmp_path / "nowhere", tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no finished checkpoint"):
        export_hf(tmp_path / "empty", tmp_path / "hf")
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000002.tmp").mkdir(parents=True)  # an interrupted save: never committed
    with pytest.raises(ExportError, match="holds no finished checkpoint"):
        export_hf(ckpts, tmp_path / "hf", log=lambda *_: None)
    cfg = ModelConfig(**BASE, **CASES["gpt2-tied-nobias"])
    folder = _write_checkpoint(ckpts / "step-00000003", _random_model(cfg, 0), step=3)
    data = bytearray((folder / shard_file(0, 0)).read_bytes())
    data[-100] ^= 1  # one flipped bit: exporting it would hand out silently wrong weights
    (folder / shard_file(0, 0)).write_bytes(bytes(data))
    for given in (ckpts, folder):
        with pytest.raises(ExportError, match="model-stage00-tp00.pt does not match its SHA-256"):
            export_hf(given, tmp_path / "hf", log=lambda *_: None)
    (folder / shard_file(0, 0)).unlink()
    with pytest.raises(ExportError, match="model-stage00-tp00.pt is missing"):
        export_hf(folder, tmp_path / "hf")


def test_cli_exits_5_naming_the_refused_option(tmp_path, capsys):
    cfg = ModelConfig(**BASE, norm="layernorm", pos="sinusoidal", mlp="gelu")
    folder = _write_checkpoint(tmp_path / "step-00000001", _random_model(cfg, 0), step=1)
    assert main(["export", str(folder), "--format", "hf", str(tmp_path / "hf")]) == EXIT_EXPORT_ERROR == 5
    err = capsys.readouterr().err
    assert err.startswith("distlm: export error: model.pos=sinusoidal"), err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 5  # --format defaults to hf
    err = capsys.readouterr().err
    assert err.startswith("distlm: export error: ") and "no such checkpoint" in err, err
    with pytest.raises(SystemExit) as exited:  # argparse: only hf is a format
        main(["export", str(folder), "--format", "gguf", str(tmp_path / "hf")])
    assert exited.value.code == 2


def test_cli_subprocess_exit_code(tmp_path):
    result = run_distlm(["export", str(tmp_path / "nowhere"), "--format", "hf", str(tmp_path / "hf")],
                        timeout=120, check=False)
    assert result.returncode == 5, result.stdout
    assert "distlm: export error: " in result.stdout and "no such checkpoint" in result.stdout


# --------------------------------------------------------------------------- acceptance: a real 3D run


LLAMA = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
         "model.pos=rope", "model.mlp=swiglu", "model.norm=rmsnorm", "model.tie_embeddings=true",
         "model.vocab_size=258"]  # the byte tokenizer's 257, rounded up so tp=2 divides it
STEPS = 4


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tp2_pp2_run_exports_through_the_cli(tmp_path):
    data = tmp_path / "shards"
    prepare_corpus([str(package_source_corpus(tmp_path))], str(data), tokenizer="byte", seq_len=32,
                   val_fraction=0.0, block_rows=64, log=lambda *_: None)
    run_dir = tmp_path / "run"
    run_distlm(["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data}", f"run.dir={run_dir}",
                f"train.max_steps={STEPS}", "train.log_every=1", "train.batch_size=8", "train.micro_batch_size=2",
                f"optim.decay_steps={STEPS}", "optim.warmup_steps=1", "train.resume=never",
                "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", *LLAMA], nproc=4, timeout=240)
    folder = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(p.name for p in folder.glob("model-*.pt")) == [
        "model-stage00-tp00.pt", "model-stage00-tp01.pt", "model-stage01-tp00.pt", "model-stage01-tp01.pt"]

    out = tmp_path / "hf"
    result = run_distlm(["export", str(run_dir / "checkpoints"), "--format", "hf", str(out)], timeout=120)
    assert "LlamaForCausalLM" in result.stdout and "model.safetensors" in result.stdout

    ours = load_one_process_model(folder, lambda m: Transformer(ModelConfig(**m), seed=0)).eval()
    hf = _hf_model(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == 2
    tokens = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    diff = (a - b).abs().max().item()
    MAX_DIFF["tp2-pp2-run"] = diff
    assert diff <= TOL, f"logits differ by {diff:.2e}"
    assert json.loads((out / "distlm_export.json").read_text())["source"]["step"] == STEPS
