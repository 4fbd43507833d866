"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): job bodies name the model and the
dataset registered by schemathesis_seed.py instead of random strings, so schema-valid bodies
create real jobs and the stateful phase follows their links. Only string values are replaced:
a body made invalid on purpose (negative testing) stays invalid."""

import os
import random
import uuid

import schemathesis

MODEL = os.environ["COMPRESSD_ST_MODEL"]
DATASET = os.environ["COMPRESSD_ST_DATASET"]


@schemathesis.hook
def map_body(ctx, body):
    if ctx.operation.method.upper() != "POST" or ctx.operation.path != "/v1/jobs":
        return body
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        task = body.get("task")
        if isinstance(task, dict) and isinstance(task.get("dataset"), str):
            task["dataset"] = DATASET
    return body


# Valid pipelines for half of the positive job bodies. Random bodies that fit the schema are
# nearly always refused on meaning (a stage's settings against the model, the task against the
# data); these make sure jobs exist for the stateful phase to get, follow, cancel and delete.
VALID_PIPELINES = [
    [{"type": "quantize", "scheme": "int8"}],
    [{"type": "prune", "sparsity": 0.5}, {"type": "quantize", "scheme": "int4"}],
    [{"type": "finetune", "epochs": 1, "learning_rate": 0.001, "batch_size": 8}],
]


@schemathesis.hook
def before_call(ctx, case, kwargs):
    method, path = case.operation.method.upper(), case.operation.path
    # The seeded model and dataset must outlive the run: deleting them (a link from their
    # listing leads there) asks for a random id instead, which answers 404 as documented.
    if method == "DELETE" and path in ("/v1/models/{id}", "/v1/datasets/{id}"):
        if (case.path_parameters or {}).get("id") in (MODEL, DATASET):
            case.path_parameters["id"] = str(uuid.uuid4())
        return
    if method != "POST" or path != "/v1/jobs":
        return
    meta = getattr(case, "meta", None)
    positive = meta is not None and meta.generation.mode.name == "POSITIVE"
    if not positive or not isinstance(case.body, dict) or random.random() < 0.5:
        return
    body = {
        "model": MODEL,
        "task": {"type": "text_classification", "dataset": DATASET},
        "pipeline": random.choice(VALID_PIPELINES),
    }
    for kept in ("priority", "dry_run"):
        if kept in case.body:
            body[kept] = case.body[kept]
    body["name"] = f"st-{random.randrange(10**6)}"
    case.body = body
