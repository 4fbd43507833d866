"""Registers a tiny BERT classifier and a labelled dataset on a running compressd, so that
Schemathesis' job bodies can name them (see schemathesis_hooks.py) and create real jobs whose
OpenAPI links (get, cancel, delete) the stateful phase then follows.

Usage: python schemathesis_seed.py BASE_URL KEY WORK_DIR   (prints `MODEL_ID DATASET_ID`)
"""

import json
import pathlib
import sys

import httpx
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification

base, key, work = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
words = ["good", "bad", "fine", "poor", "great", "awful", "ok", "meh"]
vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}

model_dir = work / "tiny-bert"
config = BertConfig(
    vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=64, num_labels=2,
)
BertForSequenceClassification(config).save_pretrained(model_dir, safe_serialization=True)
tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
tokenizer.save(str(model_dir / "tokenizer.json"))

data = work / "reviews.jsonl"
with data.open("w") as f:
    for i in range(40):
        positive = i % 2 == 0
        text = " ".join(words[(i + j) % 4 * 2 + (0 if positive else 1)] for j in range(3))
        f.write(json.dumps({"text": text, "label": "pos" if positive else "neg"}) + "\n")

client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
names = ["config.json", "model.safetensors", "tokenizer.json"]
files = [("file", (name, (model_dir / name).read_bytes())) for name in names]
model = client.post("/v1/models", data={"name": "tiny-bert"}, files=files)
if model.status_code != 201:
    sys.exit(f"registering the model: {model.status_code} {model.text}")
dataset = client.post("/v1/datasets", files=[("file", ("reviews.jsonl", data.read_bytes()))])
if dataset.status_code != 201:
    sys.exit(f"registering the dataset: {dataset.status_code} {dataset.text}")
print(model.json()["id"], dataset.json()["id"])
