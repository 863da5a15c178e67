"""`calm train OUT --quick` end to end: corpus, tokenizer, autoencoder, CALM and baseline, then load and generate."""

from __future__ import annotations

import json
import math

import torch

import calm_engine
from calm_engine import LLM, SamplingParams
from calm_engine.cli import main
from calm_engine.model.calm import CalmModel
from calm_engine.model.token_llama import TokenLlama
from calm_engine.train.recipe import QUICK_RECIPE, STAGES


def test_quick_recipe_trains_loads_and_generates(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["train", str(out), "--quick"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert set(STAGES) <= set(record)
    # Every trained stage learned something: its held-out loss is below the untrained one (uniform guessing).
    assert record["token_baseline"]["heldout_loss"] < 0.9 * math.log(QUICK_RECIPE.vocab_size)
    assert record["autoencoder"]["heldout_ce"] < 0.9 * math.log(QUICK_RECIPE.vocab_size)

    calm = calm_engine.load(out / "calm")
    assert isinstance(calm, CalmModel) and calm.tokenizer is not None
    assert calm.tokenizer.decode(calm.tokenizer.encode("Thou art, sir.")) == "Thou art, sir."
    baseline = calm_engine.load(out / "token_baseline")
    assert isinstance(baseline, TokenLlama) and baseline.tokenizer is not None
    # The export (the shipped form): float16 weights that load as float32, equal to the trained ones to fp16 rounding.
    exported = calm_engine.load(out / "export" / "calm")
    assert exported.dtype == torch.float32 and exported.tokenizer is not None
    for name, weight in calm.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], weight, rtol=2**-10, atol=1e-7)
    assert isinstance(calm_engine.load(out / "export" / "token_baseline"), TokenLlama)

    params = SamplingParams(max_tokens=12, seed=3, ignore_eos=True)
    for model in (calm, baseline):
        [output] = LLM(model).generate(["To be, or not to be"], params)
        assert len(output.token_ids) == 12 and isinstance(output.text, str)

    capsys.readouterr()
    assert main(["generate", "--model", str(out / "calm"), "--seed", "1", "--max-tokens", "8", "Good morrow"]) == 0
    assert capsys.readouterr().out.startswith("Good morrow")

    data = out / "corpus" / "heldout.jsonl"
    for model_dir in (out / "calm", out / "token_baseline"):
        assert main(["eval", "brierlm", str(model_dir), "--data", str(data), "--max-documents", "2"]) == 0
        assert "BrierLM" in capsys.readouterr().out
