"""The conformance fixture format (calm-conformance/1): cases.json + expected.safetensors + checkpoint folders.

A fixture directory holds `autoencoder/` and `calm/` (pickled weights), `autoencoder_safetensors/` and
`calm_safetensors/` (the same weights as safetensors), `expected.safetensors` with every input and output tensor
named `<case>.<tensor>`, and `cases.json` describing each case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

FORMAT = "calm-conformance/1"
CHECKPOINT_DIRS = {
    "bin": ("autoencoder", "calm"),
    "safetensors": ("autoencoder_safetensors", "calm_safetensors"),
}


@dataclass
class Fixture:
    root: Path
    cases: dict
    meta: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def open(cls, root: str | Path) -> Fixture:
        root = Path(root)
        spec = json.loads((root / "cases.json").read_text())
        if spec.get("format") != FORMAT:
            raise ValueError(f"{root}/cases.json: format {spec.get('format')!r}, expected {FORMAT!r}")
        tensors = load_file(root / spec.get("tensors_file", "expected.safetensors"))
        return cls(root, spec["cases"], spec.get("meta", {}), tensors)

    def case(self, name: str) -> dict:
        return self.cases[name]

    def input(self, case: str, index: int) -> torch.Tensor:
        """The case's index-th input, sliced along its first axis when the spec says `rows: "a:b"`."""
        spec = self.cases[case]["inputs"][index]
        tensor = self.tensors[spec["name"]]
        if "rows" in spec:
            start, stop = (int(x) for x in spec["rows"].split(":"))
            tensor = tensor[start:stop]
        return tensor

    def output(self, case: str, tensor: str) -> torch.Tensor:
        return self.tensors[f"{case}.{tensor}"]

    def checkpoint_dir(self, fmt: str, which: str) -> Path:
        autoencoder, calm = CHECKPOINT_DIRS[fmt]
        return self.root / (autoencoder if which == "autoencoder" else calm)
