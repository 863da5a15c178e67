"""`calm generate --input prompts.jsonl --output out.jsonl`: generation for a file of prompts, one JSON object per line
in and out, in input order. Under `torchrun --nproc-per-node N` each rank generates every N-th prompt and rank 0
writes the file; prompt i's seed is its own ("seed" on its line, else --seed + i), so its output does not depend on
the number of ranks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from calm_engine.distributed.group import Shard
from calm_engine.engine.llm_engine import LLM
from calm_engine.jsonl import read_records
from calm_engine.sampling_params import SamplingParams


def read_prompts(path: Path) -> list[dict]:
    """Each non-blank line: {"prompt": str, "seed": int (optional)}; anything else is a ValueError naming the line."""
    records = read_records(path, "prompt", "prompts")
    for number, record in records:
        seed = record.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"{path}: line {number}: 'seed' must be an integer in [0, 2**63), got {seed!r}")
    return [record for _, record in records]


def generate_file(
    llm: LLM, records: list[dict], params_for: Callable[[int, int | None], SamplingParams], shard: Shard
) -> list[dict] | None:
    """Generate this rank's prompts; rank 0 gets every prompt's output record in input order, other ranks None.

    params_for(i, line_seed) gives prompt i's SamplingParams.
    """
    mine = shard.take(range(len(records)))
    params = [params_for(i, records[i].get("seed")) for i in mine]
    outputs = llm.generate([records[i]["prompt"] for i in mine], params, use_tqdm=shard.is_main) if mine else []
    done = [
        {
            "index": i,
            "prompt": records[i]["prompt"],
            "output": output.text,
            "token_ids": output.token_ids,
            "finish_reason": output.finish_reason,
            "seed": p.seed,
        }
        for i, output, p in zip(mine, outputs, params, strict=True)
    ]
    gathered = shard.gather(done)
    if not shard.is_main:
        return None
    return sorted((record for part in gathered for record in part), key=lambda record: record["index"])


def write_outputs(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
