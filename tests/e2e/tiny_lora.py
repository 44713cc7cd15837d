"""Write a tiny random LoRA adapter (PEFT format) for tiny_hf_llama's model:
`python tiny_lora.py DIR SEED`.

Run with the vLLM venv's Python (it has torch and safetensors). The adapter changes the query
and value projections of both layers by a rank-8 product large enough that the model's greedy
answer changes, so a test can tell an answer of the adapter from one of the base.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HIDDEN, LAYERS, RANK = 64, 2, 8  # tiny_hf_llama's shape; q and v are both 64 x 64 there
TARGETS = ("q_proj", "v_proj")


def write(directory: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for target in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=generator)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": None,
    }))
    return directory


if __name__ == "__main__":
    write(Path(sys.argv[1]), int(sys.argv[2]))
