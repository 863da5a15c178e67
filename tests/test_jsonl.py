"""The JSON-lines inputs (calm_engine/jsonl.py): BrierLM's documents and `calm generate --input`'s prompts."""

import pytest

from calm_engine.brierlm_cli import read_texts
from calm_engine.prompt_file import read_prompts


def test_documents_and_prompts_are_read_with_blank_lines_skipped(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = ['{"text": "a", "prompt": "p"}', "", '{"text": "b", "prompt": "q", "seed": 3}']
    lines.append('{"text": "c", "prompt": "r"}')
    path.write_text("\n".join(lines) + "\n")
    assert read_texts(path) == ["a", "b", "c"]
    assert read_texts(path, max_documents=2) == ["a", "b"]
    assert [r["prompt"] for r in read_prompts(path)] == ["p", "q", "r"]
    assert read_prompts(path)[1]["seed"] == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
        ('{"prompt": "a"}\n["a"]\n', "line 2 is not a JSON object with a string field 'prompt'"),
        ('{"prompt": "a"}\n\n{"prompt": 5}\n', "line 3 is not a JSON object with a string field 'prompt'"),
        ('{"prompt": "a", "seed": -1}\n', r"line 1: 'seed' must be an integer in \[0, 2\*\*63\)"),
        ('{"prompt": "a", "seed": true}\n', "line 1: 'seed' must be an integer"),
        ("\n\n", "no prompts"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_a_file_without_documents_is_refused(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        read_texts(path)
