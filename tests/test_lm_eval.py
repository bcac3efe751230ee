"""lm-eval on a local task agrees with `modadapt eval` (lm-eval is a test extra: `pip install -e .[test]`).

A `loglikelihood_rolling` perplexity task over a jsonl file written here (no download) is run by
lm-eval on a converted byte-level preset through `lm_eval_model`, and compared with
`modadapt eval` of the same directory on the same text.

Conventions, and how the test lines them up:

- lm-eval scores every token of a document, the first one conditioned on the tokenizer's BOS
  (`HFLM.prefix_token_id`); `modadapt eval` packs text into blocks and scores each block's tokens
  after its first. So the text given to `modadapt eval` is BOS + document (under the presets'
  byte tokenizer BOS is id 1, the byte 0x01), in one block of len(document) + 1 tokens: both then
  score the same len(document) tokens with the same inputs.
- lm-eval's `byte_perplexity` is exp(-loglikelihood / UTF-8 bytes); with ids = bytes it is the
  token perplexity `modadapt eval` reports. `word_perplexity` divides by the document's
  whitespace-separated words instead: the test rescales `modadapt eval`'s loss the same way.
"""

from __future__ import annotations

import json
import math
import re

import pytest

import modadapt
from modadapt.cli import main

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (it is in the test extra: pip install -e .[test])"
)
pytestmark = pytest.mark.usefixtures("one_thread")

DOCUMENT = (
    "Mixture-of-Depths routes each token either through a layer or around it. The router is "
    "trained with the model; at decode time a causal rule decides alone, so the cache stays exact. "
    "Skipped tokens keep their hidden state and write no keys or values."
)

TASK = """\
task: modadapt_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def test_lm_eval_perplexity_matches_modadapt_eval(tmp_path, capsys, monkeypatch, randomize_routers):
    from lm_eval.tasks import TaskManager

    from modadapt.recipes.lm_adapt import lm_eval_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = modadapt.convert(modadapt.build_preset("tiny-llama"), router="topk", capacity=0.5)
    modadapt.save(randomize_routers(model, scale=0.5), tmp_path / "mod")  # routing that really skips

    (tmp_path / "tasks").mkdir()
    data = tmp_path / "doc.jsonl"
    data.write_text(json.dumps({"text": DOCUMENT}) + "\n")
    (tmp_path / "tasks" / "local_ppl.yaml").write_text(TASK.format(data=data))
    lm = lm_eval_model(modadapt.load(tmp_path / "mod"), batch_size=1, max_length=512)  # tokenizer: the saved one
    assert lm.prefix_token_id == 1 and lm.tok_encode(DOCUMENT) == list(DOCUMENT.encode())
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["modadapt_local_ppl"],
        bootstrap_iters=0,
        log_samples=False,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    metrics = out["results"]["modadapt_local_ppl"]

    (tmp_path / "eval.txt").write_bytes(b"\x01" + DOCUMENT.encode())  # BOS + the document: one block
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "mod"),
                "--data",
                str(tmp_path / "eval.txt"),
                "--seq-len",
                str(len(DOCUMENT.encode()) + 1),
                "--json",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ours = json.loads(capsys.readouterr().out)
    assert (ours["blocks"], ours["tokens"]) == (1, len(DOCUMENT.encode()))
    nll = ours["loss"] * ours["tokens"]  # summed over the document's tokens
    words = len(re.split(r"\s+", DOCUMENT))
    assert metrics["byte_perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-6)
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    assert metrics["bits_per_byte,none"] == pytest.approx(ours["loss"] / math.log(2), rel=1e-6)
    assert 1 < ours["ppl"] < 1000  # a real, untrained score, not a degenerate one
