"""``distlm finetune-classify``: a pretrained char model learns to tell two Shakespeare speakers apart.

The task is built here from ../shared/data/tinyshakespeare.txt: every line of speech of AUTOLYCUS
(the rogue of The Winter's Tale: prose, songs, cony-catching patter) and of GLOUCESTER (Richard
III: blank verse), labelled with its speaker. The speaker's name is never in the text, only the
speech. Both speakers get the same number of lines, and the held-out 30% is drawn from each
alike, so the majority-class baseline is 0.5. Closer pairs of speakers (GLOUCESTER vs ROMEO,
MENENIUS vs CORIOLANUS) are beyond the 300-step, 2-layer fixture model in 200 steps (about 0.58
against 0.5); this pair is clearly learnable, and the pretrained body learns it faster than a
random one of the same shape.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch

from distlm.config import ConfigError, ModelConfig
from distlm.data.inputs import InputError
from distlm.model import Transformer
from distlm.model.classifier import SequenceClassifier, pad_batch
from distlm.tasks.classify import (
    Example,
    class_logits,
    finetune_classifier,
    load_classifier,
    predict,
    read_examples,
    split_examples,
)
from helpers import ROOT, SHARED_DATA, distlm_command, run_distlm

SPEAKERS = ("AUTOLYCUS", "GLOUCESTER")
VAL_SHARE = 0.3
MIN_CHARS = 20  # shorter lines ("Ay, my lord.") say nothing about who speaks them


def speech_lines(corpus: Path, speakers) -> dict[str, list[str]]:
    """The lines of speech of each speaker: the corpus is blocks of a 'NAME:' line and its speech."""
    lines: dict[str, list[str]] = {name: [] for name in speakers}
    for block in corpus.read_text().split("\n\n"):
        head, *speech = block.strip("\n").split("\n")
        name = head[:-1] if re.fullmatch(r"[A-Za-z][A-Za-z' ]*:", head) else None
        if name in lines:
            lines[name] += [line for line in speech if len(line.strip()) >= MIN_CHARS]
    return lines


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def speaker_task(tmp_path_factory):
    """train.jsonl and val.jsonl: as many lines of each speaker (seeded pick), 30% of each held out."""
    folder = tmp_path_factory.mktemp("speakers")
    lines = speech_lines(SHARED_DATA / "tinyshakespeare.txt", SPEAKERS)
    per_speaker = min(len(v) for v in lines.values())
    assert per_speaker >= 200, f"the corpus should hold 200+ lines of each of {SPEAKERS}: {lines.keys()}"
    rng = random.Random(0)
    train, val = [], []
    for name in SPEAKERS:
        picked = rng.sample(lines[name], per_speaker)
        n_val = round(per_speaker * VAL_SHARE)
        val += [{"text": t, "label": name} for t in picked[:n_val]]
        train += [{"text": t, "label": name} for t in picked[n_val:]]
    rng.shuffle(train)
    rng.shuffle(val)
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(folder / "val.jsonl", val)


@pytest.fixture(scope="module")
def small_val(speaker_task):
    """The first 32 held-out lines (both speakers): for the tests that check files, not accuracy."""
    rows = speaker_task[1].read_text().splitlines()[:32]
    assert len({json.loads(r)["label"] for r in rows}) == 2
    return write_jsonl(speaker_task[1].with_name("val-small.jsonl"), [json.loads(r) for r in rows])


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``distlm ARGS`` with stdout and stderr apart (run_distlm merges them; --json is about stdout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(distlm_command(args), cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def speaker_classifier(char_checkpoint, speaker_task, tmp_path_factory):
    """The fixture model fine-tuned on the speaker task through the CLI: (out folder, --json result, stderr)."""
    train, val = speaker_task
    out = tmp_path_factory.mktemp("speaker-classifier") / "out"
    proc = run_cli(["finetune-classify", str(char_checkpoint), "--train", str(train), "--val", str(val),
                    "--out", str(out), "--steps", "200", "--batch-size", "32", "--lr", "1e-3", "--seed", "0",
                    "--eval-every", "100", "--device", "cpu", "--json"])
    assert proc.returncode == 0, f"finetune-classify exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    stdout_lines = proc.stdout.splitlines()
    assert len(stdout_lines) == 1, f"--json must print exactly one line on stdout, got:\n{proc.stdout}"
    return out, json.loads(stdout_lines[0]), proc.stderr


# --------------------------------------------------------------------------- acceptance


def test_speaker_accuracy_clearly_beats_majority_baseline(speaker_classifier, speaker_task):
    out, result, stderr = speaker_classifier
    print(f"\nspeaker task {SPEAKERS}: held-out accuracy {result['accuracy']:.4f} vs majority baseline "
          f"{result['majority_baseline']:.4f} ({result['n_val']} held-out lines)")
    assert result["labels"] == sorted(SPEAKERS) and result["n_classes"] == 2
    assert result["majority_baseline"] == pytest.approx(0.5)
    assert result["n_val"] == sum(1 for _ in open(speaker_task[1]))
    # Observed 0.83-0.88 over seeds; a model that learned nothing from the text sits at 0.5.
    assert result["accuracy"] >= result["majority_baseline"] + 0.2, result
    # Progress went to stderr, with the baseline next to the accuracy, at every eval point.
    assert "step 100/200" in stderr and "step 200/200" in stderr and "majority baseline 0.5000" in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200]
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["labels"] == result["labels"] and meta["pooling"] == "last" and meta["max_len"] == 64
    assert meta["source"]["step"] == 300 and meta["model"]["objective"] == "clm"
    assert meta["metrics"]["accuracy"] == result["accuracy"] == rows[-1]["accuracy"]
    assert not list(out.glob("*.tmp")), "a temporary file was left behind"


def test_saved_classifier_reloads_and_predicts_the_same(speaker_classifier, speaker_task):
    out, result, _ = speaker_classifier
    model, labels, tokenizer = load_classifier(out)
    val = read_examples(speaker_task[1])
    predicted = predict(model, tokenizer, [e.text for e in val])
    accuracy = sum(labels[p] == e.label for p, e in zip(predicted, val)) / len(val)
    # The training run was another process (other thread counts, so other summation orders): a
    # near-tie may fall the other way; a wrong reload (labels, pooling, weights) misses by far more.
    assert abs(accuracy - result["accuracy"]) <= 1 / len(val) + 1e-9, (accuracy, result["accuracy"])
    # A text alone and the same text in a padded batch of longer ones: the same logits.
    short = min(val, key=lambda e: len(e.text)).text
    longer = sorted((e.text for e in val), key=len)[-3:]
    ids = [[int(i) for i in tokenizer.encode(t)] for t in [short, *longer]]
    alone = class_logits(model, ids[:1], torch.device("cpu"))
    batched = class_logits(model, ids, torch.device("cpu"))
    assert len(ids[0]) < len(ids[-1])
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("objective,pos,pooling", [("clm", "learned", "last"), ("clm", "rope", "mean"),
                                                   ("mlm", "learned", "mean"), ("mlm", "sinusoidal", "last")])
def test_padding_never_changes_a_prediction(objective, pos, pooling):
    """Causal or bidirectional body, either pooling, any pad id: padding is neither attended nor pooled."""
    cfg = ModelConfig(vocab_size=40, max_seq_len=32, n_layers=2, d_model=32, n_heads=4, pos=pos, objective=objective)
    model = SequenceClassifier(Transformer(cfg, seed=0), n_classes=3, pooling=pooling, max_len=32, pad_id=0)
    torch.nn.init.normal_(model.score.weight)  # a zero head would give equal logits whatever it read
    model.eval()
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (5, 17, 32, 9)]
    with torch.no_grad():
        alone = torch.cat([model(*pad_batch([t], pad_id=0)) for t in texts])
        for pad_id in (0, 7, 39):
            batched = model(*pad_batch(texts, pad_id=pad_id))
            torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_bad_jsonl_exits_3_naming_file_and_line(tmp_path, char_checkpoint):
    good = [{"text": "To be, or not to be", "label": "a"}, {"text": "that is the question", "label": "b"}]
    cases = {
        "not JSON": (good + ["{'text': 'single quotes', 'label': 'a'}"], r"bad\.jsonl:3: not valid JSON"),
        "no label": (good + [{"text": "Whether 'tis nobler", "tag": "a"}], r"bad\.jsonl:3: no 'label' field"),
        "one class": ([{"text": "line one", "label": 1}, {"text": "line two", "label": 1}],
                      r"label '1'; a classifier needs at least 2 classes"),
    }
    for name, (rows, message) in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        proc = run_distlm(["finetune-classify", str(char_checkpoint), "--train", str(path), "--out",
                           str(tmp_path / "out")], timeout=120, check=False)
        assert proc.returncode == 3, f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}"
        assert re.search(message, proc.stdout), f"{name}: {proc.stdout[-3000:]}"
        assert "Traceback" not in proc.stdout


def test_more_bad_input_names_the_line(tmp_path, char_checkpoint):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "Now is the winter", "label": "x"},
                                                    {"text": "of our discontent", "label": "y"}] * 3)
    bad_lines = {
        "unseen.jsonl": ({"text": "Made glorious summer", "label": "z"}, r"unseen\.jsonl:2: label 'z' never occurs"),
        "empty.jsonl": ({"text": "  ", "label": "x"}, r"empty\.jsonl:2: 'text' is empty"),
        "float.jsonl": ({"text": "by this sun", "label": 1.0}, r"float\.jsonl:2: the label must be a string or an int"),
        "list.jsonl": ([1, 2], r"list\.jsonl:2: expected a JSON object"),
        "char.jsonl": ({"text": "unknown \u00e9 here", "label": "x"}, r"char\.jsonl:2: the model's tokenizer cannot"),
    }
    for name, (row, message) in bad_lines.items():
        val = write_jsonl(tmp_path / name, [{"text": "of York", "label": "x"}, row])
        with pytest.raises(InputError, match=message):
            finetune_classifier(char_checkpoint, train, tmp_path / "out", val_path=val, steps=1, device="cpu",
                                log=lambda _: None)


def test_bad_flags_exit_2(tmp_path, char_checkpoint, speaker_task):
    train = str(speaker_task[0])
    # The exit code once through the command line; the other flags' errors are the same ConfigError.
    proc = run_distlm(["finetune-classify", str(char_checkpoint), "--train", train, "--out", str(tmp_path / "o"),
                       "--device", "cpu", "--steps", "0"], timeout=120, check=False)
    assert proc.returncode == 2 and "--steps must be an integer of at least 1" in proc.stdout, proc.stdout[-3000:]
    for flags, message in (({"max_len": 65}, r"--max-len must be from 1 to the model's max_seq_len \(64\)"),
                           ({"val_fraction": 1.5}, "--val-fraction must be between 0 and 1"),
                           ({"device": f"cuda:{torch.cuda.device_count()}"}, "--device cuda:"),  # one past the last
                           ({"val_path": train, "val_fraction": 0.2}, "--val and --val-fraction exclude each other")):
        with pytest.raises(ConfigError, match=message):
            finetune_classifier(char_checkpoint, train, tmp_path / "o", log=lambda _: None,
                                **{"device": "cpu", **flags})
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- split, freezing, reproducibility


def test_val_fraction_split_is_seeded_and_per_class():
    examples = [Example(f"text {i}", "ab"[i % 3 == 0], i + 1) for i in range(300)]  # 100 'b', 200 'a'
    train, val = split_examples(examples, 0.2, seed=5)
    assert (train, val) == split_examples(examples, 0.2, seed=5)
    assert val != split_examples(examples, 0.2, seed=6)[1]
    assert sorted(e.label for e in val).count("b") == 20 and len(val) == 60
    assert {e.line for e in train} | {e.line for e in val} == set(range(1, 301))
    assert not {e.line for e in train} & {e.line for e in val}


def test_freeze_body_trains_the_head_only_and_runs_repeat(tmp_path, char_checkpoint, speaker_task, small_val):
    from safetensors.torch import load_file

    from distlm.checkpoint.pretrained import load_pretrained

    kwargs = dict(val_path=small_val, steps=4, batch_size=8, eval_every=4, device="cpu", log=lambda _: None)
    finetune_classifier(char_checkpoint, speaker_task[0], tmp_path / "frozen", freeze_body=True, **kwargs)
    frozen = load_file(str(tmp_path / "frozen" / "classifier.safetensors"))
    pretrained = load_pretrained(char_checkpoint, log=lambda _: None).model.state_dict()
    for name, tensor in pretrained.items():
        assert torch.equal(frozen[f"body.{name}"], tensor), name
    assert frozen["score.weight"].abs().sum() > 0

    runs = [finetune_classifier(char_checkpoint, speaker_task[0], tmp_path / f"run{i}", **kwargs) for i in (0, 1)]
    assert runs[0]["val_loss"] == runs[1]["val_loss"]
    first, second = (load_file(str(tmp_path / f"run{i}" / "classifier.safetensors")) for i in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["body.blocks.0.attn.q_proj.weight"], pretrained["blocks.0.attn.q_proj.weight"])


# --------------------------------------------------------------------------- --out, devices


def test_out_replaces_a_classifier_and_refuses_other_folders(tmp_path, char_checkpoint, speaker_task, small_val,
                                                            monkeypatch):
    from distlm.checkpoint.errors import CheckpointError
    from distlm.tasks import classify

    kwargs = dict(val_path=small_val, steps=1, batch_size=4, device="cpu", log=lambda _: None)
    # A run folder (or any folder of other files) is refused before anything in it is touched.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="is not a classifier folder"):
        finetune_classifier(char_checkpoint, speaker_task[0], run_dir, **kwargs)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'

    out = tmp_path / "clf"
    finetune_classifier(char_checkpoint, speaker_task[0], out, **kwargs)
    load_classifier(out)
    # A run into it that fails leaves no classifier.json beside its own files: nothing loads.
    def fail(*args, **_):
        raise FloatingPointError("stopped")
    monkeypatch.setattr(classify, "train_classifier", fail)
    with pytest.raises(FloatingPointError):
        finetune_classifier(char_checkpoint, speaker_task[0], out, **kwargs)
    with pytest.raises(CheckpointError, match="not a readable classifier folder"):
        load_classifier(out)
    monkeypatch.undo()
    # ... and it is still a classifier's folder: a new run replaces it.
    result = finetune_classifier(char_checkpoint, speaker_task[0], out, **kwargs)
    assert load_classifier(out)[1] == result["labels"]
    meta = json.loads((out / "classifier.json").read_text())
    meta["labels"] = meta["labels"] + ["third"]  # the head has 2 rows
    (out / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit classifier.json"):
        load_classifier(out)


def test_bf16_only_where_the_chosen_gpu_has_it(monkeypatch):
    """auto: bf16 on a GPU of compute capability 8.0+ only (torch.cuda.is_bf16_supported() also
    says yes where bf16 is emulated, and asks about the current GPU, not the chosen one)."""
    from distlm.tasks.classify import resolve_autocast

    asked = []

    def capability(device=None):
        asked.append(device)
        return {0: (7, 0), 1: (9, 0)}[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert resolve_autocast("auto", torch.device("cuda:0")) is None
    assert resolve_autocast("auto", torch.device("cuda:1")) is torch.bfloat16
    assert resolve_autocast("bf16", torch.device("cuda:1")) is torch.bfloat16
    with pytest.raises(ConfigError, match="compute capability 7.0"):
        resolve_autocast("bf16", torch.device("cuda:0"))
    assert resolve_autocast("fp32", torch.device("cuda:1")) is None
    assert resolve_autocast("auto", torch.device("cpu")) is None
    assert resolve_autocast("bf16", torch.device("cpu")) is torch.bfloat16
    assert torch.device("cuda:1") in asked
