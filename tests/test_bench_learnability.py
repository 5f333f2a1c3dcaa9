"""benchmarks/learnability.py: the probe rows are right by construction, and a short run
writes the JSON the README table is generated from."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import learnability  # noqa: E402

from bicache_jax import tasks  # noqa: E402


def test_probe_rows_hold_their_answer():
    rng = np.random.default_rng(0)
    for _ in range(20):
        (prefix, _), (question, _), (canvas, is_resp) = learnability.copy_row(rng, 4)
        assert is_resp and canvas[0] == question[1] and canvas[1:] == (tasks.EOS_ID,) * 3
        assert question[-1] == tasks.SEP_ID and prefix[0] == tasks.BOS_ID
        (prefix, _), (question, _), (canvas, _) = learnability.recall_row(rng, 6)
        words = tasks.decode(prefix[1:]).split(" ; ")
        table = dict(w.replace(" ;", "").split(" = ") for w in words)
        assert len(table) == 6
        assert tasks.decode(canvas) == table[tasks.decode(question[1:2])]


def test_short_run_writes_the_result(tmp_path):
    out = tmp_path / "learn.json"
    learnability.main(["--steps-copy", "2", "--steps-recall", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [p["probe"] for p in result["probes"]] == ["copy"] * 4 + ["recall"] * 2
    for p in result["probes"]:
        assert [c["step"] for c in p["curve"]] == [0, 2]
        assert all(0 <= c["accuracy"] <= 1 for c in p["curve"])
    table = learnability.markdown_table(result)
    assert table.count("\n") == 7 and "not within 2" in table


def test_format_rows_hold_their_answer_in_each_form():
    rng = np.random.default_rng(1)
    period = {"bare": 2, "suite": 4, "adjacent": 3}
    value_at = {"bare": 1, "suite": 2, "adjacent": 1}
    key_at = {"bare": 0, "suite": 1, "what": 1, "mirror": 0}
    for table, question in learnability.FORMATS:
        for _ in range(10):
            (prefix, _), (ask, _), (canvas, is_resp) = learnability.format_row(
                rng, 4, table, question)
            keys = prefix[1::period[table]]
            values = prefix[1 + value_at[table]::period[table]]
            assert len(keys) == 4 and len(set(keys)) == 4 and is_resp
            assert (ask[-1] == tasks.SEP_ID) == (question == "suite")
            assert canvas == (values[keys.index(ask[key_at[question]])],)


def test_format_probe_runs_the_forms_and_seed_asked_for(tmp_path):
    out = tmp_path / "fmt.json"
    learnability.main(["--probes", "format", "--steps-format", "1", "--batch", "4",
                       "--formats", "adjacent:what", "--seed", "3", "--out", str(out)])
    (probe,) = json.loads(out.read_text())["probes"]
    assert (probe["table"], probe["question"], probe["seed"]) == ("adjacent", "what", 3)
    with pytest.raises(SystemExit):
        learnability.main(["--probes", "format", "--formats", "adjacent:how"])


def test_suite_rows_are_served_facts_requests_held_out_on_eval_seeds():
    rng = np.random.default_rng(2)
    for held_out in (False, True):
        for _ in range(10):
            (prefix, p_resp), (prompt, q_resp), (canvas, is_resp) = learnability.suite_row(
                rng, held_out=held_out)
            assert is_resp and not (p_resp or q_resp)
            assert tasks.check_answer(tasks.decode(prefix), tasks.decode(prompt)) == \
                tasks.decode(canvas)
            assert len(prefix) + len(prompt) <= learnability.SUITE_CONTEXT[1] + 16
    train = {learnability.suite_row(np.random.default_rng(i))[0][0] for i in range(50)}
    held = {learnability.suite_row(np.random.default_rng(i), True)[0][0] for i in range(50)}
    assert not train & held  # never the same world (their seeds differ by EVAL_SEED_START)
