"""Export a checkpoint as a Hugging Face ``transformers`` model: ``distlm export CKPT --format hf OUT``.

The weights come from the layout-independent model files (:func:`consolidated_state_dict`), so a
checkpoint of any (tp, pp, dp) layout exports the same way and the optimizer state is never read.
Two families of distlm models have an exact ``transformers`` counterpart:

* GPT-2 style -> ``GPT2LMHeadModel``: ``norm=layernorm``, ``pos=learned``, ``mlp=gelu`` (distlm's GELU
  is the exact erf form: ``activation_function="gelu"``, not ``gelu_new``), plain multi-head
  attention. GPT-2 fuses q, k and v into one ``c_attn`` and stores its linears as ``Conv1D``
  (``[in, out]``, the transpose of ``nn.Linear``); it always has biases, so a model trained without
  them gets zero biases, which compute the same thing.
* Llama style -> ``LlamaForCausalLM``: ``norm=rmsnorm``, ``pos=rope``, ``mlp=swiglu``, grouped-query
  attention through ``num_key_value_heads``. distlm's rotary layout is already Llama's rotate-half
  (pair ``(i, i + head_dim/2)``), so q and k need no permutation.

Both scale attention scores by ``1/sqrt(head_dim)`` as distlm does. Anything else (sinusoidal
positions, LayerNorm with RoPE, ...) has no such counterpart and is refused with :class:`ExportError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

# No torch at import time: the CLI imports ExportError to catch it, cheaply.
MARKER = "distlm.json"
NOTE = "distlm_export.json"

GPT2_STYLE = {"norm": "layernorm", "pos": "learned", "mlp": "gelu"}
LLAMA_STYLE = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}
SUPPORTED = ("GPT-2 style (model.norm=layernorm, model.pos=learned, model.mlp=gelu, model.n_kv_heads unset or "
             "= n_heads) or Llama style (model.norm=rmsnorm, model.pos=rope, model.mlp=swiglu)")


class ExportError(ValueError):
    """The checkpoint cannot be exported: not found, incomplete, or a model with no HF counterpart."""


# --------------------------------------------------------------------------- which checkpoint


def _resolve_step_folder(path: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """The checkpoint step folder that ``path`` names, verified against its manifest.

    ``path`` is a step folder, a checkpoints folder (its ``latest`` file names the step folder),
    or a run folder that holds ``checkpoints/``. Every file's SHA-256 is checked first, and a
    damaged checkpoint is an error, not a silent export of an older one.
    """
    from distlm.checkpoint.errors import CheckpointError
    from distlm.checkpoint.pretrained import resolve_checkpoint

    try:
        return resolve_checkpoint(path, log)
    except CheckpointError as e:
        raise ExportError(str(e)) from None


# --------------------------------------------------------------------------- checks


def _model_config(folder: Path):
    from distlm.config import ModelConfig

    try:
        model = json.loads((folder / MARKER).read_text())["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{folder / MARKER}: cannot read the model config ({type(e).__name__}: {e})") from e
    try:
        cfg = ModelConfig(**model)
    except TypeError as e:
        raise ExportError(f"{folder / MARKER}: the model config does not fit this distlm's ModelConfig: {e}") from e
    return cfg, model


def _style(cfg) -> str:
    """``gpt2`` or ``llama``, or ExportError naming the options that rule both out."""
    if cfg.objective != "clm":
        raise ExportError(f"model.objective={cfg.objective!r} cannot be exported: only causal LM (clm) models")
    off = {}
    for name, style in (("gpt2", GPT2_STYLE), ("llama", LLAMA_STYLE)):
        off[name] = [f"model.{k}={getattr(cfg, k)}" for k, v in style.items() if getattr(cfg, k) != v]
    kv = cfg.n_kv_heads or cfg.n_heads
    if not off["gpt2"] and kv != cfg.n_heads:
        raise ExportError(f"model.n_kv_heads={cfg.n_kv_heads} (grouped-query attention) cannot be exported as "
                          f"GPT-2, whose attention has as many key/value heads as query heads "
                          f"(model.n_heads={cfg.n_heads}); supported: {SUPPORTED}")
    for name in ("gpt2", "llama"):
        if not off[name]:
            return name
    closest = min(off, key=lambda k: len(off[k]))
    label, style = {"gpt2": ("GPT-2", GPT2_STYLE), "llama": ("Llama", LLAMA_STYLE)}[closest]
    needs = ", ".join(f"model.{k}={v}" for k, v in style.items())
    raise ExportError(f"{', '.join(off[closest])}: no Hugging Face model computes this (the closest, {label} "
                      f"style, needs {needs}); supported: {SUPPORTED}")


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the one-process Transformer of ``cfg`` (built on meta, no memory)."""
    import torch

    from distlm.model import Transformer

    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    except ValueError as e:
        raise ExportError(f"the saved model config is not a valid model: {e}") from e
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_state(state: dict[str, torch.Tensor], cfg, folder: Path) -> None:
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{name} is {list(state[name].shape)}, the config needs {list(shape)}"
             for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing}"] if missing else []
        parts += ([f"unexpected {unexpected}"] if unexpected else []) + wrong
        raise ExportError(f"{folder}: the model files do not fit the saved model config "
                          f"(vocab_size={cfg.vocab_size}, max_seq_len={cfg.max_seq_len}, d_model={cfg.d_model}): "
                          + "; ".join(parts))


# --------------------------------------------------------------------------- conversions


def _common_config(cfg) -> dict:
    """config.json keys both styles share: no tokenizer ids (none is exported), fp32 weights."""
    return {"tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
            "pad_token_id": None, "use_cache": True, "torch_dtype": "float32"}


def _gpt2(state: dict[str, torch.Tensor], cfg, hidden: int) -> tuple[dict, dict]:
    import torch

    d = cfg.d_model

    def take(name):
        return state.pop(name)

    def bias_or_zeros(name, size):
        return state.pop(name) if name in state else torch.zeros(size)

    out = {"transformer.wte.weight": take("tok_emb.weight"),
           "transformer.wpe.weight": take("positions.pos_emb.weight")}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[dst + b + ".weight"] = take(src + a + ".weight")
            out[dst + b + ".bias"] = bias_or_zeros(src + a + ".bias", d)
        # Conv1D holds [in, out]; c_attn's outputs are q, then k, then v, each heads in order.
        qkv = [take(f"{src}attn.{p}_proj.weight") for p in "qkv"]
        out[dst + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()
        out[dst + "attn.c_attn.bias"] = torch.cat([bias_or_zeros(f"{src}attn.{p}_proj.bias", d) for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = take(src + "attn.o_proj.weight").t()
        out[dst + "attn.c_proj.bias"] = bias_or_zeros(src + "attn.o_proj.bias", d)
        out[dst + "mlp.c_fc.weight"] = take(src + "mlp.up_proj.weight").t()
        out[dst + "mlp.c_fc.bias"] = bias_or_zeros(src + "mlp.up_proj.bias", hidden)
        out[dst + "mlp.c_proj.weight"] = take(src + "mlp.down_proj.weight").t()
        out[dst + "mlp.c_proj.bias"] = bias_or_zeros(src + "mlp.down_proj.bias", d)
    out["transformer.ln_f.weight"] = take("head.norm_f.weight")
    out["transformer.ln_f.bias"] = bias_or_zeros("head.norm_f.bias", d)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("head.lm_head.weight")
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "n_embd": d,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": hidden,
        "activation_function": "gelu",  # distlm's nn.GELU() is the exact erf form
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **_common_config(cfg),
    }
    return out, config


def _llama(state: dict[str, torch.Tensor], cfg, hidden: int) -> tuple[dict, dict]:
    out = {"model.embed_tokens.weight": state.pop("tok_emb.weight")}
    names = {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight"}
    for p in ("q", "k", "v", "o"):
        for kind in ("weight", "bias"):
            names[f"attn.{p}_proj.{kind}"] = f"self_attn.{p}_proj.{kind}"
    for p in ("gate", "up", "down"):
        for kind in ("weight", "bias"):
            names[f"mlp.{p}_proj.{kind}"] = f"mlp.{p}_proj.{kind}"
    for i in range(cfg.n_layers):
        for src, dst in names.items():
            if f"blocks.{i}.{src}" in state:
                # distlm rotates pairs (i, i + head_dim/2), as Llama's rotate_half: q/k rows as they are
                out[f"model.layers.{i}.{dst}"] = state.pop(f"blocks.{i}.{src}")
    out["model.norm.weight"] = state.pop("head.norm_f.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state.pop("head.lm_head.weight")
    head_dim = cfg.d_model // cfg.n_heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        **_common_config(cfg),
    }
    return out, config


def _standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32, contiguous, no two tensors sharing memory (safetensors refuses shared storage)."""
    import torch

    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# --------------------------------------------------------------------------- export


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``distlm_export.json`` into ``out_dir``.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` then computes distlm's logits. Returns
    ``out_dir``. Raises :class:`ExportError` for a missing or incomplete checkpoint and for a model
    that has no ``transformers`` counterpart.
    """
    from safetensors.torch import save_file

    from distlm.checkpoint.consolidate import consolidated_state_dict
    from distlm.model import mlp_hidden_size

    folder = _resolve_step_folder(checkpoint, log)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    cfg, model_dict = _model_config(folder)
    style = _style(cfg)
    try:
        state = consolidated_state_dict(folder)  # the model-*.pt files only, never the optimizer state
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    _check_state(state, cfg, folder)
    hidden = mlp_hidden_size(cfg)
    tensors, config = (_gpt2 if style == "gpt2" else _llama)(state, cfg, hidden)
    if state:  # every weight must have found its place
        raise ExportError(f"{folder}: weights left over by the {style} conversion: {sorted(state)}")
    tensors = _standalone(tensors)

    marker = json.loads((folder / MARKER).read_text())
    from distlm import __version__

    note = {"exported_by": f"distlm {__version__}", "format": "hf", "architecture": config["architectures"][0],
            "source": {"checkpoint": folder.name, "step": marker.get("step")}, "model": model_dict}
    if cfg.dropout:
        note["dropout"] = f"model.dropout={cfg.dropout} is set to 0 in config.json (inference)"

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    from distlm.fsutil import atomic_write_text

    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / NOTE, json.dumps(note, indent=2) + "\n")
    n_params = sum(t.numel() for t in tensors.values())
    log(f"exported {folder} (step {marker.get('step')}) as {config['architectures'][0]} to {out_dir}")
    log(f"  model.safetensors: {len(tensors)} tensors, {n_params:,} parameters, float32, "
        f"{weights.stat().st_size / 2**20:.1f} MiB"
        + ("; lm_head tied to the token embedding" if cfg.tie_embeddings else ""))
    log(f"  config.json: {config['model_type']}, load with transformers' AutoModelForCausalLM.from_pretrained")
    log(f"  {NOTE}: the source checkpoint and its distlm model config (no tokenizer is exported)")
    return out_dir
