"""The baseline: a plain single-process PyTorch training loop, nothing but torch.

Same model (distlm's Transformer, built from the same config), same batch, same AdamW with
weight decay on matrices, same gradient clipping and LR schedule as ``distlm train``. Batches
are random windows of an in-memory token array (nanoGPT's get_batch), so the baseline pays no
data-loading cost at all. Prints one JSON line: tokens/s over the timed steps.

    python benchmarks/plain_loop.py CONFIG.yaml --tokens FILE.npy --steps 200 --warmup 20 [key=value ...]

On a GPU (``--device cuda``) it is nanoGPT's loop: fp32 weights, ``--precision bf16`` runs the
forward under ``torch.autocast`` in bfloat16, AdamW is torch's fused kernel, batches are copied
from pinned memory without blocking, ``--compile`` wraps the model in ``torch.compile``, and the
timed steps are bracketed by ``torch.cuda.synchronize()``; the JSON line then also holds
``mem_bytes`` (peak allocated). The defaults (``--device cpu --precision fp32``, no compile) are
the CPU loop exactly as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch

from distlm.config import load_config
from distlm.model import Transformer, parameter_groups
from distlm.train.schedule import learning_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--tokens", required=True, help=".npy file of training token ids")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast the forward to bfloat16, weights and optimizer stay fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiled in the warm-up)")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    data = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    seq_len, batch = cfg.train.seq_len, cfg.train.batch_size
    cfg.model.max_seq_len = cfg.model.max_seq_len or seq_len
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    cuda = args.device == "cuda"
    if cuda:
        model.to("cuda")
    optimizer_options = {"fused": True} if cuda else {}
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, **optimizer_options)
    forward = torch.compile(model) if args.compile else model

    def autocast():
        if args.precision == "bf16":
            return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def get_batch():
        starts = torch.randint(len(data) - seq_len - 1, (batch,))
        x = torch.stack([data[i:i + seq_len] for i in starts])
        y = torch.stack([data[i + 1:i + 1 + seq_len] for i in starts])
        if cuda:
            x = x.pin_memory().to("cuda", non_blocking=True)
            y = y.pin_memory().to("cuda", non_blocking=True)
        return x, y

    total = args.warmup + args.steps
    for step in range(total):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.optim, total)
        x, y = get_batch()
        with autocast():
            loss = forward(x, y)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0:
            loss.item()  # the same host sync a logged step costs distlm
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"tokens_per_s": args.steps * batch * seq_len / seconds, "steps": args.steps,
              "seconds": seconds, "final_loss": loss.item()}
    if cuda:
        result["mem_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
