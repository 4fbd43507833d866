//! The `distill` stage end to end on the tiny keyword task: a student of the fine-tuned teacher's
//! layers trained on the task loss and every kind of knowledge, each term reported as it trains
//! and as a curve in the report.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::Result;
use candle_core::Device;
use compressd_engine::pipeline::{Event, PipelineInputs, PipelineResult, Workbench};
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::{run_job, Session};
use serde_json::{json, Value};
use tiny_task::{write_data, write_model};

use crate::tiny_task;

/// Fine-tunes the tiny 2-layer classifier, then distills it with `distill` (a stage spec);
/// returns the report's stage details, the student's and teacher's accuracy, and the events.
fn finetune_then_distill(
    distill: Value,
) -> Result<(Value, f64, f64, Vec<Event>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_model(&model_dir)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec: JobSpec = serde_json::from_value(json!({
        "name": "tiny-distill", "model": model_dir,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            distill
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.2}
    }))?;
    assert!(spec.validate().is_empty(), "{:?}", spec.validate());
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let out = dir.path().join("out");
    let events = Mutex::new(Vec::new());
    let sink = |e: Event| events.lock().unwrap().push(e);
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &sink,
        &AtomicBool::new(false),
    )?;
    let report = &result.report;
    let (teacher, student) = (&report.stages[0], &report.stages[1]);
    assert!(student.metrics.parameters < teacher.metrics.parameters);
    // The report sets the student beside the teacher it came from.
    let side_by_side = &student.details["teacher_and_student"];
    assert_eq!(side_by_side["metric"], "accuracy");
    assert_eq!(
        side_by_side["teacher"]["parameters"],
        teacher.metrics.parameters
    );
    assert_eq!(
        side_by_side["student"]["parameters"],
        student.metrics.parameters
    );
    let kept = side_by_side["metric_kept"].as_f64().unwrap();
    let expected = student.metrics.accuracy.unwrap() / teacher.metrics.accuracy.unwrap();
    assert!((kept - expected).abs() < 1e-12);
    assert!(side_by_side["speedup_batch32"].as_f64().unwrap() > 0.0);
    let markdown = std::fs::read_to_string(out.join("report.md"))?;
    assert!(
        markdown.contains("## Teacher and student (`1-distill`)"),
        "{markdown}"
    );
    // The student is what the job saved, and it loads back and scores the same.
    let config: Value =
        serde_json::from_slice(&std::fs::read(result.final_dir.join("config.json"))?)?;
    assert_eq!(
        config["num_hidden_layers"],
        student.details["student_layers"]
    );
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let saved = out.join("stages/1-distill/model");
    let reloaded = session.load_saved(&saved)?;
    let again = session.evaluate(&reloaded, &saved)?;
    assert_eq!(again.accuracy, student.metrics.accuracy);
    Ok((
        student.details.clone(),
        student.metrics.accuracy.unwrap(),
        teacher.metrics.accuracy.unwrap(),
        events.into_inner().unwrap(),
        dir,
    ))
}

#[test]
fn response_distillation_into_a_one_layer_student() -> Result<()> {
    let (details, accuracy, _, _, dir) = finetune_then_distill(json!(
        {"type": "distill", "student_layers": 1, "layer_init": "last", "epochs": 4,
         "learning_rate": 0.003, "temperature": 2.0}
    ))?;
    assert_eq!(details["student_layers"], 1);
    assert_eq!(details["kept_teacher_layers"], json!([1]));
    assert_eq!(details["objective"], "0.5·task + 0.5·response");
    assert!(
        accuracy > 0.9,
        "the student learns the keyword task: {accuracy}"
    );
    // No file of the teacher or of the objective is left in the student's folder.
    let tensors = std::fs::read(
        dir.path()
            .join("out/stages/1-distill/model/model.safetensors"),
    )?;
    assert!(!String::from_utf8_lossy(&tensors[..2000.min(tensors.len())]).contains("distill."));
    Ok(())
}

#[test]
fn every_kind_of_knowledge_is_trained_and_reported_term_by_term() -> Result<()> {
    let (details, accuracy, teacher, events, _dir) = finetune_then_distill(json!(
        {"type": "distill", "student_layers": 1, "epochs": 4, "learning_rate": 0.003,
         "weights": {"task": 0.5, "response": 0.5, "feature": 0.5, "relation": 0.5},
         "layer_map": [1],
         "feature": {"loss": "cosine", "tokens": "all", "attention": true},
         "relation": {"loss": "kl", "temperature": 0.5},
         "log_every_steps": 2}
    ))?;
    assert!(
        accuracy >= teacher - 0.15 && accuracy > 0.8,
        "student {accuracy}, teacher {teacher}"
    );
    assert_eq!(details["layer_map"], json!([[0, 1]]));
    let curves = details["training"]["loss_curves"]
        .as_object()
        .expect("loss curves in the report");
    let names: Vec<&str> = curves.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["attention", "feature", "relation", "response", "task"]
    );
    let steps = details["training"]["steps"].as_u64().unwrap();
    for (name, curve) in curves {
        let at: Vec<u64> = serde_json::from_value(curve["steps"].clone())?;
        let values: Vec<f64> = serde_json::from_value(curve["values"].clone())?;
        assert_eq!(at.len(), values.len());
        assert_eq!(at.first(), Some(&2), "{name}: every 2 steps");
        assert_eq!(at.last(), Some(&steps), "{name}: and the last step");
        assert!(
            values.iter().all(|v| v.is_finite() && *v >= 0.0),
            "{name}: {values:?}"
        );
    }
    // Knowledge is learned: the feature and response terms fall over training.
    for name in ["feature", "response"] {
        let values = curves[name]["values"].as_array().unwrap();
        let (first, last) = (
            values[0].as_f64().unwrap(),
            values.last().unwrap().as_f64().unwrap(),
        );
        assert!(last < first, "{name}: {first} → {last}");
    }
    // The same terms went out with the progress events, only on logging steps.
    let logged: Vec<(u64, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress {
                index: 1,
                step,
                loss_terms,
                ..
            } if !loss_terms.is_empty() => Some((*step, loss_terms.len())),
            _ => None,
        })
        .collect();
    assert!(!logged.is_empty());
    assert!(logged
        .iter()
        .all(|&(step, n)| n == 5 && (step % 2 == 0 || step == steps)));
    // Fine-tuning (the task loss alone) reports no terms.
    assert!(events.iter().all(|e| !matches!(e,
        Event::Progress { index: 0, loss_terms, .. } if !loss_terms.is_empty())));
    Ok(())
}

#[test]
fn feature_matching_alone_on_pooled_vectors_with_mse_and_infonce() -> Result<()> {
    let (details, _, _, _, _dir) = finetune_then_distill(json!(
        {"type": "distill", "student_layers": 1, "epochs": 2, "learning_rate": 0.003,
         "weights": {"feature": 1.0, "relation": 0.2},
         "feature": {"loss": "mse", "tokens": "cls"},
         "relation": {"loss": "infonce", "pooling": "cls"}}
    ))?;
    assert_eq!(details["objective"], "1·feature + 0.2·relation");
    // Uniform map: the one student layer matches the teacher's last.
    assert_eq!(details["layer_map"], json!([[0, 1]]));
    Ok(())
}

/// The same stage on a decoder: a 1-layer student of a fine-tuned 2-layer Llama, trained on the
/// next-token loss with response knowledge over every predicted token (the teacher's 8 likeliest
/// tokens of each) and feature and relation
/// knowledge; perplexity is the metric set side by side, and the student's GGUF generates in
/// candle-transformers' quantized Llama.
/// Runs `pipeline` (with `acceptance`, if any) on a random tiny Llama over a corpus of short
/// stories, asking for safetensors and GGUF, and returns the result with the folder it lives in.
fn tiny_llama_job(
    pipeline: Value,
    acceptance: Option<Value>,
) -> Result<(PipelineResult, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    crate::interop::write_llama(&model_dir, true)?;
    let dataset = dir.path().join("corpus.txt");
    crate::interop::write_corpus(&dataset)?;
    let mut spec = json!({
        "name": "tiny-llama-distill", "model": model_dir,
        "task": {"type": "language_modeling", "dataset": dataset, "max_length": 16},
        "pipeline": pipeline,
        "outputs": ["safetensors", "gguf"]
    });
    if let Some(acceptance) = acceptance {
        spec["acceptance"] = acceptance;
    }
    let spec: JobSpec = serde_json::from_value(spec)?;
    assert!(spec.validate().is_empty(), "{:?}", spec.validate());
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &dir.path().join("out"),
        &|_: Event| {},
        &AtomicBool::new(false),
    )?;
    Ok((result, dir))
}

/// The final folder's GGUF generates 4 tokens of the vocabulary in candle-transformers.
fn assert_gguf_generates(result: &PipelineResult, config: &Value) -> Result<()> {
    let generated =
        crate::gguf_generation::generate(&result.final_dir.join("model.gguf"), &[1, 2, 3], 4)?;
    let vocabulary = config["vocab_size"].as_u64().unwrap_or(0) as u32;
    assert_eq!(generated.len(), 4);
    assert!(generated.iter().all(|&t| t < vocabulary), "{generated:?}");
    Ok(())
}

#[test]
fn a_llama_student_is_distilled_measured_by_perplexity_and_exported_as_gguf() -> Result<()> {
    let (result, _dir) = tiny_llama_job(
        json!([
            {"type": "finetune", "epochs": 2, "learning_rate": 0.01, "batch_size": 8},
            {"type": "distill", "student_layers": 1, "epochs": 2, "learning_rate": 0.01,
             "batch_size": 8, "log_every_steps": 1, "top_k": 8,
             "weights": {"task": 0.5, "response": 0.5, "feature": 0.2, "relation": 0.2},
             "feature": {"loss": "cosine"}, "relation": {"loss": "infonce"}}
        ]),
        Some(json!({"metric": "perplexity", "max_relative_drop": 10.0})),
    )?;
    let student = &result.report.stages[1];
    let side_by_side = &student.details["teacher_and_student"];
    assert_eq!(side_by_side["metric"], "perplexity");
    let perplexity = student.metrics.perplexity.expect("perplexity measured");
    assert!(perplexity.is_finite() && perplexity > 1.0, "{perplexity}");
    assert_eq!(side_by_side["student"]["metric"], perplexity);
    assert!(side_by_side["metric_kept"].as_f64().unwrap() > 0.0);
    let curves = student.details["training"]["loss_curves"]
        .as_object()
        .unwrap();
    for term in ["task", "response", "feature", "relation"] {
        assert!(curves.contains_key(term), "{term}: {curves:?}");
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(result.final_dir.join("config.json"))?)?;
    assert_eq!(config["num_hidden_layers"], 1);
    assert_gguf_generates(&result, &config)
}

/// Runs `pipeline` on the tiny task's base encoder with `models` named, returning the result.
fn run_named(
    dir: &std::path::Path,
    label: &str,
    pipeline: Value,
    models: &[(&str, &std::path::Path)],
) -> Result<compressd_engine::pipeline::PipelineResult> {
    let model_dir = dir.join("model");
    if !model_dir.exists() {
        write_model(&model_dir)?;
        write_data(&dir.join("data.jsonl"))?;
    }
    let dataset = dir.join("data.jsonl");
    let spec: JobSpec = serde_json::from_value(json!({
        "name": label, "model": model_dir,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": pipeline
    }))?;
    assert!(spec.validate().is_empty(), "{:?}", spec.validate());
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
        models: models
            .iter()
            .map(|(name, path)| (name.to_string(), path.to_path_buf()))
            .collect(),
    };
    let ignore = |_: Event| {};
    Ok(run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &dir.join(format!("out-{label}")),
        &ignore,
        &AtomicBool::new(false),
    )?)
}

/// A teacher and a student given by name (registered models, as the service resolves them) are
/// used instead of the pipeline's model: the student trains against the named teacher and
/// replaces the pipeline's model. Named models of another tokenizer or label set, a student not
/// smaller than its teacher and a name that resolves to nothing fail the job, naming the field.
#[test]
fn named_teachers_and_students_are_loaded_checked_and_distilled() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let finetune =
        json!({"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16});
    let teacher = run_named(dir.path(), "teacher", json!([finetune]), &[])?.final_dir;
    // A 1-layer student built from the named teacher (the pipeline's own model is untouched).
    let built = run_named(
        dir.path(),
        "built",
        json!([{"type": "distill", "teacher": "the-teacher", "student_layers": 1, "epochs": 2,
                "learning_rate": 0.003, "batch_size": 16}]),
        &[("the-teacher", &teacher)],
    )?;
    let stage = &built.report.stages[0];
    assert_eq!(stage.details["teacher"], "the-teacher");
    assert_eq!(stage.details["teacher_layers"], 2);
    assert_eq!(stage.details["student_layers"], 1);
    let teacher_accuracy = built.report.baseline.metrics.accuracy.unwrap();
    assert!(
        stage.metrics.accuracy.unwrap() >= 0.9,
        "a student of a fine-tuned teacher learns the keyword task: {:?} (pipeline model {teacher_accuracy})",
        stage.metrics.accuracy
    );
    let student = built.final_dir;
    // Both named: the student is trained as it is, against the teacher, with feature knowledge.
    let both = run_named(
        dir.path(),
        "both",
        json!([{"type": "distill", "teacher": "t", "student": "s", "epochs": 1,
                "learning_rate": 0.003, "batch_size": 16,
                "weights": {"task": 0.5, "response": 0.5, "feature": 0.1}}]),
        &[("t", &teacher), ("s", &student)],
    )?;
    let stage = &both.report.stages[0];
    assert_eq!(stage.details["student"], "s");
    assert_eq!(stage.details["student_layers"], 1);
    assert!(stage.details["kept_teacher_layers"].is_null());
    assert!(
        stage.details["training"]["loss_curves"]
            .get("feature")
            .is_some(),
        "{}",
        stage.details["training"]
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(both.final_dir.join("config.json"))?)?;
    assert_eq!(config["num_hidden_layers"], 1);

    // The base encoder has no head for the task's labels: not a teacher.
    let base = dir.path().join("model");
    let refused = |label: &str, stage: Value, models: &[(&str, &std::path::Path)]| {
        let error = run_named(dir.path(), label, json!([stage]), models)
            .err()
            .unwrap_or_else(|| panic!("{label}: the job must fail"));
        error.to_string()
    };
    let error = refused(
        "headless",
        json!({"type": "distill", "teacher": "base", "student_layers": 1}),
        &[("base", &base)],
    );
    assert!(
        error.contains("teacher") && error.contains("labels"),
        "{error}"
    );
    let error = refused(
        "as-large",
        json!({"type": "distill", "teacher": "t", "student": "t"}),
        &[("t", &teacher)],
    );
    assert!(
        error.contains("student") && error.contains("not smaller"),
        "{error}"
    );
    let error = refused(
        "unresolved",
        json!({"type": "distill", "teacher": "nowhere", "student_layers": 1}),
        &[],
    );
    assert!(
        error.contains("teacher") && error.contains("no model"),
        "{error}"
    );
    // Another tokenizer: the teacher's ids of two words swapped.
    let other = dir.path().join("other-tokenizer");
    std::fs::create_dir_all(&other)?;
    for entry in std::fs::read_dir(&teacher)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::copy(&path, other.join(path.file_name().unwrap()))?;
        }
    }
    let mut tokenizer: Value =
        serde_json::from_slice(&std::fs::read(other.join("tokenizer.json"))?)?;
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let (movie, film) = (vocab["movie"].clone(), vocab["film"].clone());
    vocab.insert("movie".into(), film);
    vocab.insert("film".into(), movie);
    std::fs::write(other.join("tokenizer.json"), tokenizer.to_string())?;
    let error = refused(
        "tokenizer",
        json!({"type": "distill", "teacher": "t", "student_layers": 1}),
        &[("t", &other)],
    );
    assert!(
        error.contains("teacher") && error.contains("another tokenizer"),
        "{error}"
    );
    Ok(())
}

/// A narrower student: 2 of the teacher's 4 heads and 32 of its 64 FFN neurons in its one layer,
/// the lightest cut; it trains with feature knowledge, saves and loads back with the same
/// accuracy (checked by `finetune_then_distill`).
#[test]
fn a_narrower_student_is_sliced_from_the_teacher_and_trained() -> Result<()> {
    let (details, accuracy, _, _, dir) = finetune_then_distill(json!(
        {"type": "distill", "student_layers": 1, "attention_heads": 2, "intermediate_size": 32,
         "epochs": 4, "learning_rate": 0.003,
         "weights": {"task": 0.5, "response": 0.5, "feature": 0.1}}
    ))?;
    assert_eq!(details["narrowed"]["attention_heads"], json!([4, 2]));
    assert_eq!(details["narrowed"]["intermediate_size"], json!([64, 32]));
    assert!(
        accuracy > 0.9,
        "the narrow student learns the keyword task: {accuracy}"
    );
    let config: Value = serde_json::from_slice(&std::fs::read(
        dir.path().join("out/stages/1-distill/model/config.json"),
    )?)?;
    assert_eq!(config["intermediate_size"], 32);
    // BERT's head size is hidden / heads in transformers, so fewer heads are recorded per layer
    // and the folder is written padded (as structured pruning's); the FFN is cut for real.
    assert_eq!(
        config[compressd_engine::family::LAYER_WIDTHS_FIELD]["attention_heads"],
        json!([2])
    );
    let tensors = candle_core::safetensors::load(
        dir.path()
            .join("out/stages/1-distill/model/model.safetensors"),
        &Device::Cpu,
    )?;
    let ffn = tensors
        .iter()
        .find(|(n, _)| n.ends_with("intermediate.dense.weight"))
        .map(|(_, t)| t.dims().to_vec());
    assert_eq!(ffn, Some(vec![32, 32]));
    Ok(())
}

/// A student narrower in its hidden size: MiniLM-style BERT (hidden 32, 4 heads of 8) to hidden
/// 16 with 2 heads of the same size. Every tensor that carries the residual stream loses the same
/// 16 channels, the config says hidden 16 and 2 heads (nothing padded: transformers derives the
/// head size 8 from them), feature knowledge goes through a projection, and the student learns.
#[test]
fn a_student_with_a_smaller_hidden_size_is_sliced_trained_and_saved_plainly() -> Result<()> {
    let (details, accuracy, _, _, dir) = finetune_then_distill(json!(
        {"type": "distill", "student_layers": 1, "hidden_size": 16, "epochs": 6,
         "learning_rate": 0.003, "weights": {"task": 0.5, "response": 0.5, "feature": 0.1}}
    ))?;
    assert_eq!(details["narrowed"]["hidden_size"], json!([32, 16]));
    assert_eq!(details["narrowed"]["attention_heads"], json!([4, 2]));
    assert!(
        accuracy > 0.9,
        "the narrow student learns the keyword task: {accuracy}"
    );
    let folder = dir.path().join("out/stages/1-distill/model");
    let config: Value = serde_json::from_slice(&std::fs::read(folder.join("config.json"))?)?;
    assert_eq!(config["hidden_size"], 16, "{config}");
    assert_eq!(config["num_attention_heads"], 2, "{config}");
    assert!(
        config
            .get(compressd_engine::family::LAYER_WIDTHS_FIELD)
            .is_none(),
        "{config}"
    );
    let tensors = candle_core::safetensors::load(folder.join("model.safetensors"), &Device::Cpu)?;
    let shape = |suffix: &str| {
        tensors
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, t)| t.dims().to_vec())
    };
    assert_eq!(shape("word_embeddings.weight").map(|d| d[1]), Some(16));
    assert_eq!(shape("embeddings.LayerNorm.weight"), Some(vec![16]));
    assert_eq!(shape("attention.self.query.weight"), Some(vec![16, 16]));
    assert_eq!(shape("attention.output.dense.weight"), Some(vec![16, 16]));
    assert_eq!(shape("intermediate.dense.weight"), Some(vec![64, 16]));
    assert_eq!(shape("layer.0.output.dense.weight"), Some(vec![16, 64]));
    assert_eq!(shape("pooler.dense.weight"), Some(vec![16, 16]));
    assert_eq!(shape("classifier.weight").map(|d| d[1]), Some(16));
    Ok(())
}

/// The same on a Llama (hidden 32, 4 query heads over 2 key/value heads, head size 8) to hidden
/// 16: 2 query heads over 1 key/value head, and the GGUF (whose readers derive the head size from
/// the hidden size and head count) still generates in candle-transformers.
#[test]
fn a_llama_student_with_a_smaller_hidden_size_exports_a_gguf_that_generates() -> Result<()> {
    let (result, _dir) = tiny_llama_job(
        json!([
            {"type": "distill", "student_layers": 1, "hidden_size": 16, "epochs": 2,
             "learning_rate": 0.01, "batch_size": 8,
             "weights": {"task": 0.5, "response": 0.5, "feature": 0.2}}
        ]),
        None,
    )?;
    let student = &result.report.stages[0];
    assert_eq!(student.details["narrowed"]["hidden_size"], json!([32, 16]));
    let perplexity = student.metrics.perplexity.expect("perplexity measured");
    assert!(perplexity.is_finite() && perplexity > 1.0, "{perplexity}");
    let config: Value =
        serde_json::from_slice(&std::fs::read(result.final_dir.join("config.json"))?)?;
    assert_eq!(config["hidden_size"], 16, "{config}");
    assert_eq!(config["num_attention_heads"], 2, "{config}");
    assert_eq!(config["num_key_value_heads"], 1, "{config}");
    assert_gguf_generates(&result, &config)
}

/// Hidden sizes the student cannot have: refused at submission where the spec alone says so
/// (a named student, attention matching), and as a readable failure when the teacher's shapes
/// decide (not a multiple of the head size, or disagreeing with `attention_heads`).
#[test]
fn hidden_sizes_a_student_cannot_have_are_refused_with_the_reason() -> Result<()> {
    let pointers = |stage: Value| -> Vec<String> {
        let spec: JobSpec = serde_json::from_value(json!({
            "name": "x", "model": "m", "task": {"type": "text_classification", "dataset": "d"},
            "pipeline": [stage]
        }))
        .unwrap();
        spec.validate().into_iter().map(|v| v.pointer).collect()
    };
    assert_eq!(
        pointers(json!({"type": "distill", "student": "s", "hidden_size": 16})),
        ["/pipeline/0/hidden_size"]
    );
    assert_eq!(
        pointers(json!({"type": "distill", "hidden_size": 16,
                        "weights": {"task": 0.5, "feature": 0.5}, "feature": {"attention": true}})),
        ["/pipeline/0/hidden_size"]
    );
    assert_eq!(
        pointers(json!({"type": "distill", "hidden_size": 0})),
        ["/pipeline/0/hidden_size"]
    );
    for (extra, expected) in [
        (json!({"hidden_size": 20}), "multiple of its head size 8"),
        (json!({"hidden_size": 32}), "smaller than the teacher's 32"),
        (
            json!({"hidden_size": 16, "attention_heads": 3}),
            "does not fit hidden_size 16",
        ),
    ] {
        let mut stage = json!({"type": "distill", "student_layers": 1, "epochs": 1});
        if let (Value::Object(s), Value::Object(e)) = (&mut stage, extra.clone()) {
            s.extend(e);
        }
        let error = finetune_then_distill(stage)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.contains(expected), "{extra}: {error}");
    }
    Ok(())
}

/// `cache_teacher` in a job: after the first epoch every batch comes from the cache (the teacher
/// runs for the first epoch's batches only), the report says so with the bytes held, and the
/// student learns as it does without the cache.
#[test]
fn a_cached_teacher_runs_for_the_first_epoch_only() -> Result<()> {
    let (details, accuracy, _, _, _dir) = finetune_then_distill(json!(
        {"type": "distill", "student_layers": 1, "epochs": 3, "learning_rate": 0.003,
         "cache_teacher": true, "weights": {"task": 0.5, "response": 0.5, "feature": 0.1}}
    ))?;
    let cache = &details["training"]["teacher_cache"];
    let computed = cache["batches_computed"].as_u64().unwrap_or(0);
    let cached = cache["batches_from_cache"].as_u64().unwrap_or(0);
    assert!(computed > 0, "{cache}");
    assert_eq!(
        cached,
        2 * computed,
        "two of three epochs from the cache: {cache}"
    );
    assert_eq!(cache["examples_over_budget"], 0, "{cache}");
    assert!(cache["cached_bytes"].as_u64().unwrap_or(0) > 0, "{cache}");
    assert!(
        accuracy > 0.9,
        "the student learns with a cached teacher: {accuracy}"
    );
    Ok(())
}

/// Heads and neurons ranked by structured pruning's calibrated importance (`taylor` on the task
/// loss, `activation` on input norms) instead of magnitude; `lora` is refused at submission.
#[test]
fn a_narrower_student_can_keep_the_units_structured_pruning_would() -> Result<()> {
    for importance in ["taylor", "activation"] {
        let (details, accuracy, _, _, _dir) = finetune_then_distill(json!(
            {"type": "distill", "student_layers": 1, "attention_heads": 2,
             "intermediate_size": 32, "narrow_importance": importance, "epochs": 4,
             "learning_rate": 0.003}
        ))?;
        assert_eq!(details["narrowed"]["order"], importance, "{details}");
        assert!(accuracy > 0.9, "{importance}: {accuracy}");
    }
    let spec: JobSpec = serde_json::from_value(json!({
        "name": "x", "model": "m", "task": {"type": "text_classification", "dataset": "d"},
        "pipeline": [{"type": "distill", "attention_heads": 2, "narrow_importance": "lora"}]
    }))?;
    let pointers: Vec<String> = spec.validate().into_iter().map(|v| v.pointer).collect();
    assert_eq!(pointers, ["/pipeline/0/narrow_importance"]);
    Ok(())
}
