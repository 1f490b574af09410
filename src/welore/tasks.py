"""Downstream tasks of the WeLore paper, from the shared data folder: prompts, answers, scoring.

Every task yields `Example(prompt, options, answer)`. Multiple-choice / yes-no tasks are scored by
the summed log-probability of each option's tokens after the prompt (the option with the highest
wins); SVAMP has no options and is scored by exact match of the first number in a greedy
continuation. Training uses `prompt + options[answer]` with the loss on the answer tokens only.

Splits are fixed by a seed: a task that ships one split is shuffled with it and cut into eval
(the first `n_eval`, at most 90% of the task) and train (the rest); CommonsenseQA uses its own train /
dev files. Fine-tuning with the keep-the-best guard also sets a validation split aside from train
(`split_validation`): the guard chooses by it, so the eval examples stay unseen until they are reported.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from .data import data_dir
from .errors import WeloreError

TASKS = ("boolq", "csqa", "strategyqa", "svamp", "coinflip", "date", "tracking")
_PASSAGE_CHARS = 1200  # BoolQ passages can run to pages; keep prompts within short training windows


@dataclass(frozen=True)
class Example:
    prompt: str
    options: tuple[str, ...]  # continuation strings (each starts with its own separator); () = generative
    answer: int | str  # index into options, or the exact answer string for generative tasks

    @property
    def target(self) -> str:
        """The text the model is trained to produce after the prompt."""
        return self.options[self.answer] if self.options else f" {self.answer}"


def _read_json(rel: str):
    path = data_dir() / "tasks" / rel
    if not path.is_file():
        raise WeloreError(f"missing task file {path}")
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _yes_no(prompt: str, yes: bool, words=(" no", " yes")) -> Example:
    return Example(prompt, words, int(yes))


def _bigbench(ex: dict, prompt_suffix: str = "\nAnswer:", sep: str = " ") -> Example:
    opts = list(ex["target_scores"])
    answer = max(range(len(opts)), key=lambda i: ex["target_scores"][opts[i]])
    return Example(ex["input"].rstrip() + prompt_suffix, tuple(sep + o for o in opts), answer)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def load_examples(task: str) -> tuple[list[Example], list[Example] | None]:
    """(examples, separate eval examples or None) for `task`, formatted as prompts."""
    if task == "boolq":
        rows = _read_json("boolq/boolq_dev.jsonl")
        return [_yes_no(f"{r['passage'][:_PASSAGE_CHARS]}\nQuestion: {r['question']}?\nAnswer:", r["answer"])
                for r in rows], None
    if task == "csqa":
        def fmt(r):
            choices = r["question"]["choices"]
            labels = [c["label"] for c in choices]
            return Example(f"Question: {r['question']['stem']}\nAnswer:", tuple(" " + c["text"] for c in choices),
                           labels.index(r["answerKey"]))
        return ([fmt(r) for r in _read_json("CommonsenseQA/train_rand_split.jsonl")],
                [fmt(r) for r in _read_json("CommonsenseQA/dev_rand_split.jsonl")])
    if task == "strategyqa":
        return [_yes_no(f"Question: {e['input']}\nAnswer:", e["target_scores"]["Yes"] == 1, (" No", " Yes"))
                for e in _read_json("StrategyQA/task.json")["examples"]], None
    if task == "svamp":
        return [Example(f"{r['Body'].strip()} {r['Question'].strip()}\nAnswer:", (), _number(r["Answer"]))
                for r in _read_json("SVAMP/SVAMP.json")], None
    if task == "coinflip":
        return [_yes_no(f"{e['question']}\nAnswer:", e["answer"].strip().lower() == "yes")
                for e in _read_json("coin_flip/coin_flip.json")["examples"]], None
    if task == "date":
        return [_bigbench(e) for e in _read_json("Bigbench_Date/task.json")["examples"]], None
    if task == "tracking":
        # the input already ends mid-sentence ("... Alice has the "): options continue it directly
        return [_bigbench(e, prompt_suffix="", sep=" ") for e in
                _read_json("Bigbench_object_tracking/task.json")["examples"]], None
    raise WeloreError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def task_splits(task: str, seed: int = 0, n_eval: int = 200) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples of `task`, split reproducibly by `seed`; eval never overlaps train."""
    examples, given_eval = load_examples(task)
    if given_eval is not None:
        rng = random.Random(seed)
        ev = list(given_eval)
        rng.shuffle(ev)
        return examples, ev[:n_eval]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(n_eval, len(examples) - max(1, len(examples) // 10))  # >= 10% of a task is left to train on
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def split_validation(train: list[Example], n_val: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): the last `n_val` examples of a train split (at most a fifth of it) set
    aside, to choose which checkpoint a run returns without looking at the eval examples it reports."""
    n = min(n_val, len(train) // 5)
    return (train[:-n], train[-n:]) if n else (train, [])


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def first_number(text: str) -> str | None:
    """The first number in generated text, normalised like the answers ("51.0" -> "51")."""
    m = _NUM.search(text.replace(",", ""))
    return _number(float(m.group())) if m else None
