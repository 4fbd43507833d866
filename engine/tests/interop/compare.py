"""Loads a model folder written by compressd in Hugging Face transformers and compares its
predictions with the engine's on the same rows.

Usage: compare.py REQUEST.json RESULT.json

REQUEST.json (written by engine/tests/pipeline/export_interop.rs):
  {"model_dir": "...", "task": "sequence_classification" | "causal_lm",
   "rows": [{"input_ids": [...], "logits": ...}],   # the engine's ids and logits per row:
                                                     # [num_labels] or [seq][vocab]
   "tokenize": {"texts": [...], "max_length": N},   # optional: tokenize the rows' texts with
                                                     # the folder's own tokenizer (AutoTokenizer)
                                                     # instead of using the engine's ids
   "peft_adapter_dir": "...", "num_labels": N,      # optional: load model_dir as the base (with
                                                     # N labels) and this LoRA adapter onto it
                                                     # with peft.PeftModel.from_pretrained
   "compressed_tensors_dequantize": true}            # optional: a compressed-tensors folder loaded
                                                     # with CompressedTensorsConfig(dequantize=True)
RESULT.json: what was loaded (class, config architectures, missing/unexpected/mismatched keys)
and how it compares (argmax agreement, largest logit difference). The Rust test asserts on it;
this script fails only when the model cannot be loaded at all.

Runs offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set by the caller, and again here).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

# transformers 5 renamed `torch_dtype` to `dtype` (the old name still works, with a warning).
DTYPE_ARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

LOADERS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
}


def load(model_dir, task, extra=None):
    """The model in eval mode and transformers' loading report (keys it had to invent or drop)."""
    model, info = LOADERS[task].from_pretrained(
        model_dir,
        output_loading_info=True,
        attn_implementation="eager",
        **{DTYPE_ARG: torch.float32},
        **(extra or {}),
    )
    model.eval()
    keys = {
        name: sorted(str(k) for k in info.get(name, []))
        for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    return model, keys


def load_adapter(base, adapter_dir):
    """The base with the LoRA adapter loaded by peft, and the adapter keys peft could not place."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    # from_pretrained only warns about unplaced keys; loading them again reports them.
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    unexpected = set_peft_model_state_dict(model, state).unexpected_keys
    return model, sorted(str(k) for k in unexpected)


def token_ids(model_dir, request):
    """The engine's ids, or the folder tokenizer's for `tokenize.texts`, with how often they agree."""
    engine_ids = [row["input_ids"] for row in request["rows"]]
    tokenize = request.get("tokenize")
    if not tokenize:
        return engine_ids, None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = [
        tokenizer(text, truncation=True, max_length=tokenize["max_length"])["input_ids"]
        for text in tokenize["texts"]
    ]
    same = sum(a == b for a, b in zip(ours, engine_ids))
    return ours, same / len(ours)


def compare(model, task, ids_per_row, rows):
    agree = total = 0
    max_diff = 0.0
    with torch.no_grad():
        for ids, row in zip(ids_per_row, rows):
            input_ids = torch.tensor([ids], dtype=torch.long)
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0]
            theirs = logits.float().numpy()
            engine = np.asarray(row["logits"], dtype=np.float32)
            if task == "sequence_classification":
                theirs, engine = theirs[None, :], engine[None, :]
            agree += int((theirs.argmax(-1) == engine.argmax(-1)).sum())
            total += theirs.shape[0]
            if theirs.shape == engine.shape:
                max_diff = max(max_diff, float(np.abs(theirs - engine).max()))
            else:
                max_diff = float("inf")
    return agree / max(total, 1), total, max_diff


def main(request_path, result_path):
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    model_dir, task = request["model_dir"], request["task"]
    adapter_dir = request.get("peft_adapter_dir")
    extra = {"num_labels": request["num_labels"]} if "num_labels" in request else {}
    if request.get("compressed_tensors_dequantize"):
        from transformers import CompressedTensorsConfig

        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model, keys = load(model_dir, task, extra)
    if adapter_dir:
        model, keys["adapter_unexpected_keys"] = load_adapter(model, adapter_dir)
    ids_per_row, token_agreement = token_ids(model_dir, request)
    agreement, predictions, max_diff = compare(model, task, ids_per_row, request["rows"])
    result = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "class": type(model).__name__,
        "config_architectures": model.config.architectures,
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "rows": len(ids_per_row),
        "predictions": predictions,
        "argmax_agreement": agreement,
        "max_abs_logit_diff": max_diff,
        "token_agreement": token_agreement,
        **keys,
    }
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
