"""Sample text from a trained causal model: temperature, top-k and top-p (nucleus) sampling, or
greedy decoding, with a KV cache.

The prompt is run through the model once (prefill) and its keys and values kept in a
:class:`KVCache`, so each new token costs one position's forward pass instead of the whole
prefix's. A model sees at most ``model.max_seq_len`` tokens: a longer prompt is cropped to its
last ``max_seq_len`` tokens, and once the context fills the window each step recomputes the last
``max_seq_len`` tokens (a sliding window: the same tokens as without the cache, only slower).
An empty prompt starts a new document (the EOS token); a generated EOS is printed as a line
break. The same ``--seed`` gives the same text on the same device and dtype.

From Python::

    from distlm.checkpoint.pretrained import load_pretrained
    from distlm.tasks.generate import generate

    model = load_pretrained("runs/x").model
    new_ids = generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=50)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Optional

# torch is imported inside the functions: `distlm --help` imports this module to build its parser.

DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": None, "top_p": 1.0, "seed": 1337}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a run folder (its newest valid checkpoint), a checkpoints folder or one checkpoint step folder")
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="text to continue; empty (--prompt '') starts a new document")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], metavar="N",
                   help="tokens to generate per sample (default 200)")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], metavar="T",
                   help="divides the logits: lower is more conservative; 0 means greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], metavar="K",
                   help="sample only among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], metavar="P",
                   help="nucleus sampling: only among the most likely tokens whose probabilities add up to "
                        "P (default 1.0: all)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], metavar="S",
                   help="seed of the sampling generator: the same seed gives the same text (default 1337)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="independent samples of the same prompt, generated as one batch (default 1)")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on a CUDA device that supports it, else fp32 (default auto)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="the tokenizer.json the model was trained with (default: its dataset's)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole context for every token (slower; to check the cache)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sample (prompt, text, tokens, tokens_per_s, ...) instead of text")


# --------------------------------------------------------------------------- the KV cache


class _LayerSlot:
    """One layer's keys and values in a :class:`KVCache` (what ``Attention.forward`` gets)."""

    def __init__(self, owner: "KVCache", keys, values):
        self.owner, self.keys, self.values = owner, keys, values

    @property
    def start(self) -> int:
        return self.owner.length

    def update(self, k, v):
        """Store the keys and values of the new positions; return those of every cached position."""
        start = self.owner.length
        end = start + k.shape[2]
        if end > self.owner.max_len:
            raise ValueError(f"the KV cache holds {self.owner.max_len} positions; {end} were asked for "
                             f"(reset it, or recompute on a cropped window)")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The keys and values of every layer for the tokens a model has seen, preallocated.

    ``layers[i]`` is layer i's slot, [batch, kv heads, max_len, head dim] for the keys and again
    for the values (grouped-query models cache only their kv heads). ``length`` tokens are
    cached; ``Transformer.features(tokens, cache=cache)`` appends the next ones.
    """

    def __init__(self, model, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None):
        import torch

        cfg = model.cfg
        if model.tp.size != 1:
            raise ValueError("a KV cache is for a one-process model (tensor parallelism 1)")
        param = model.tok_emb.weight
        self.max_len = max_len or cfg.max_seq_len
        if self.max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={self.max_len} is past model.max_seq_len={cfg.max_seq_len}")
        head_dim = cfg.d_model // cfg.n_heads
        shape = (batch_size, cfg.n_kv_heads or cfg.n_heads, self.max_len, head_dim)
        device, dtype = device or param.device, dtype or param.dtype
        self.layers = [_LayerSlot(self, torch.empty(shape, device=device, dtype=dtype),
                                  torch.empty(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layers)]
        self.length = 0

    @property
    def full(self) -> bool:
        return self.length >= self.max_len

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused, not freed)."""
        self.length = 0


# --------------------------------------------------------------------------- next-token logits


class Context:
    """The next-token logits of a growing token sequence, with or without a KV cache.

    ``start(prompt)`` then ``push(token)`` per step, each returning float32 logits [B, vocab] for
    the next position. The model sees the last ``model.max_seq_len`` tokens. With the cache each
    step runs one position until the window is full; after that, and always without the cache,
    it runs the whole window: keys cached before the window moved would carry positions (and
    attention to tokens) that a model looking at the cropped window does not see.
    """

    def __init__(self, model, batch_size: int, capacity: int, use_cache: bool = True,
                 on_crop: Optional[Callable[[str], None]] = None):
        import torch

        self.model = model
        self.window = model.cfg.max_seq_len
        self.device = model.tok_emb.weight.device
        self.tokens = torch.empty(batch_size, capacity, dtype=torch.long, device=self.device)
        self.length = 0
        self.cache = KVCache(model, batch_size) if use_cache else None
        self.on_crop = on_crop
        self.cropped = False

    def start(self, prompt):
        """Load the prompt [B, T] (T >= 1) and return the logits after it."""
        T = prompt.shape[1]
        self.tokens[:, :T] = prompt
        self.length = T
        if self.cache is not None:
            self.cache.reset()
        return self._run_window()

    def push(self, token):
        """Append one token per row [B] and return the logits after it."""
        self.tokens[:, self.length] = token
        self.length += 1
        if self.cache is None or self.cache.full:
            return self._run_window()
        return self._logits(self.model.features(self.tokens[:, self.length - 1:self.length], cache=self.cache))

    def _run_window(self):
        """Run the model over the last ``window`` tokens (refilling the cache, if any)."""
        if self.length > self.window and not self.cropped:
            self.cropped = True
            if self.on_crop is not None:
                self.on_crop(f"the context is longer than model.max_seq_len={self.window} tokens: the model sees "
                             f"the last {self.window}" + (", recomputed for every new token (the KV cache cannot "
                                                          "slide)" if self.cache is not None else ""))
        window = self.tokens[:, max(0, self.length - self.window):self.length]
        if self.cache is not None:
            self.cache.reset()
        return self._logits(self.model.features(window, cache=self.cache))

    def _logits(self, features):
        return self.model.logits_of(features[:, -1]).float()


# --------------------------------------------------------------------------- sampling


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float,
                   num_samples: int = 1) -> None:
    """ConfigError naming the flag of the first out-of-range sampling setting."""
    from distlm.config import ConfigError

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if not temperature >= 0:  # also catches NaN
        raise ConfigError(f"--temperature must be >= 0 (0: greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be at least 1 (leave it out to sample from every token); got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (1: no nucleus cut); got {top_p}")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1; got {num_samples}")


def check_generative(model, where: str = "the model") -> None:
    """ConfigError unless ``model`` is a causal LM: a bidirectional one cannot continue a text."""
    from distlm.config import ConfigError

    if model.cfg.objective != "clm":
        raise ConfigError(f"{where} was trained with model.objective={model.cfg.objective} (masked LM: every position "
                          f"sees both sides), so it cannot generate text left to right; generate from a "
                          f"model.objective=clm checkpoint, or use this one with `distlm eval` or "
                          f"`distlm finetune-classify`")


def filter_logits(logits, temperature: float, top_k: Optional[int] = None, top_p: float = 1.0):
    """Scale ``logits`` [B, V] by 1/temperature, then keep the top-k, then the top-p nucleus.

    Removed tokens get -inf. The nucleus is the smallest set of most likely tokens whose
    probabilities reach ``top_p``; the most likely token is always in it, so a tiny ``top_p``
    is greedy.
    """
    import torch

    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # A token is dropped when the more likely ones already reach top_p without it.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits, temperature: float, top_k: Optional[int], top_p: float, generator=None):
    """The next token of each row [B]: argmax at temperature 0, else drawn from the filtered softmax."""
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: float = 1.0, generator=None, use_cache: bool = True,
             on_logits: Optional[Callable] = None, log: Optional[Callable[[str], None]] = None,
             vocab_size: Optional[int] = None):
    """``max_new_tokens`` tokens continuing ``prompt_ids``: a LongTensor [B, max_new_tokens].

    ``prompt_ids``: [T] or [B, T] token ids, T >= 1 (start a document from the EOS id). A prompt
    longer than ``model.max_seq_len`` is cropped to its last ``max_seq_len`` tokens.
    ``temperature`` 0 is greedy; ``generator``: a ``torch.Generator`` on the model's device, for
    reproducible samples. ``use_cache=False`` recomputes the whole context for every token (the
    reference the cache must match). ``on_logits(step, logits)`` sees the float32 next-token
    logits [B, V] before each draw; ``log`` gets a one-time note when the context is cropped.
    ``vocab_size``: draw only ids below it (the tokenizer's vocabulary, when the model's table
    was padded past it: those rows stand for no text and cannot be decoded).
    """
    import torch

    check_generative(model)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model_vocab = model.cfg.vocab_size
    if vocab_size is not None and not 1 <= vocab_size <= model_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{model_vocab} (the model's vocabulary)")
    device = model.tok_emb.weight.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [T] or [B, T] with T >= 1 (start a document from the tokenizer's "
                         f"EOS id); got shape {tuple(prompt.shape)}")
    # An id past the table is an IndexError on a CPU and a device-side assert (a dead CUDA context) on a GPU.
    if int(prompt.min()) < 0 or int(prompt.max()) >= model_vocab:
        raise ValueError(f"prompt_ids must be in 0..{model_vocab - 1} (the model's vocabulary); got ids from "
                         f"{int(prompt.min())} to {int(prompt.max())}: was it encoded with another tokenizer?")
    B, T = prompt.shape
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            context = Context(model, B, T + max_new_tokens, use_cache, on_crop=log)
            logits = context.start(prompt)
            for step in range(max_new_tokens):
                if on_logits is not None:
                    on_logits(step, logits)
                drawable = logits if vocab_size is None else logits[:, :vocab_size]
                token = sample_next(drawable, temperature, top_k, top_p, generator)
                if step + 1 < max_new_tokens:
                    logits = context.push(token)
                else:
                    context.tokens[:, context.length] = token
                    context.length += 1
            return context.tokens[:, T:context.length].clone()
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- the command


def resolve_dtype(requested: str, device):
    """``auto``: bf16 on a GPU that computes in it natively (half the memory traffic), else fp32."""
    import torch

    from distlm.checkpoint.pretrained import native_bf16

    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32


def encode_prompt(tokenizer, text: str):
    """The prompt's ids; an empty prompt is one EOS (the start of a document)."""
    import numpy as np

    from distlm.config import ConfigError

    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from None
    if len(ids) == 0:
        return np.array([tokenizer.eos_id], dtype=np.int64)
    return ids.astype(np.int64)


def continuation_text(tokenizer, prompt_ids, new_ids) -> str:
    """The text the new ids add to the prompt, EOS shown as a line break.

    Decoded together with the prompt and cut after it where that is exact: some tokenizers
    (SentencePiece) drop a leading space when a piece is decoded on its own.
    """
    head = tokenizer.decode(prompt_ids, eos_text="\n")
    full = tokenizer.decode(list(prompt_ids) + list(new_ids), eos_text="\n")
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(new_ids, eos_text="\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from distlm.checkpoint.pretrained import load_pretrained, pick_device
    from distlm.config import ConfigError

    temperature = 0.0 if args.greedy else args.temperature
    check_sampling(args.max_new_tokens, temperature, args.top_k, args.top_p, args.num_samples)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_pretrained(args.checkpoint, device=device, dtype=dtype, log=log)
    model = loaded.model
    check_generative(model, str(loaded.folder))
    tokenizer = loaded.tokenizer(args.tokenizer)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        flag = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"the tokenizer of {loaded.folder}'s dataset"
        raise ConfigError(f"{flag} has {tokenizer.vocab_size} ids but the model only {model.cfg.vocab_size}: it is "
                          f"not the tokenizer the model was trained with")
    prompt_ids = encode_prompt(tokenizer, args.prompt)
    log(f"generate: {loaded.folder} (step {loaded.step}), {model.num_params() / 1e6:.2f}M parameters, "
        f"{device}, {str(dtype).removeprefix('torch.')}, {'KV cache' if not args.no_kv_cache else 'no KV cache'}")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.as_tensor(prompt_ids, device=device)[None].expand(args.num_samples, -1)
    started = time.perf_counter()
    new = generate(model, prompt, args.max_new_tokens, temperature, args.top_k, args.top_p, generator,
                   use_cache=not args.no_kv_cache, log=log, vocab_size=tokenizer.vocab_size)
    new = new.cpu()  # waits for the device: the time below is the generation's
    seconds = time.perf_counter() - started
    rate = args.max_new_tokens / seconds  # per sample; the batch makes num_samples times as many
    log(f"generate: {args.num_samples} x {args.max_new_tokens} tokens in {seconds:.2f} s: "
        f"{rate:.1f} tokens/s per sample")
    _print_samples(args, loaded, tokenizer, prompt_ids, new.tolist(), rate, seconds)
    return 0


def _print_samples(args, loaded, tokenizer, prompt_ids, samples: list, rate: float, seconds: float) -> None:
    prompt_list = prompt_ids.tolist()
    for i, ids in enumerate(samples):
        text = continuation_text(tokenizer, prompt_list, ids)
        if args.json:
            print(json.dumps({"sample": i, "prompt": args.prompt, "text": text, "tokens": ids,
                              "num_tokens": len(ids), "tokens_per_s": round(rate, 2), "seconds": round(seconds, 4),
                              "checkpoint": str(loaded.folder), "step": loaded.step, "seed": args.seed,
                              "temperature": 0.0 if args.greedy else args.temperature, "top_k": args.top_k,
                              "top_p": args.top_p, "kv_cache": not args.no_kv_cache}), flush=True)
            continue
        if i:
            print("\n" + "-" * 40, flush=True)
        print(args.prompt + text, flush=True)
