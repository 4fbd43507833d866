//! Vocabulary trimming (`distill` with `vocabulary: "task"`) end to end on the tiny keyword task,
//! in the seed's order (quantize, then distill from the quantized teacher, then quantize the
//! student): the student keeps the data's tokens only, ships a renumbered tokenizer, and a resumed
//! job reads its data in the trimmed vocabulary.

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::Device;
use compressd_engine::pipeline::{Event, PipelineInputs, Workbench};
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::{run_job, Session};
use tiny_task::{write_data, write_model};

use crate::tiny_task;

#[test]
fn a_distilled_student_keeps_only_the_datas_tokens_and_ships_a_matching_tokenizer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_model(&model_dir)?;
    // The data never says "plot" or "was": the trimmed vocabulary drops them (14 → 12 tokens).
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let text = std::fs::read_to_string(&dataset)?
        .replace(" plot", " film")
        .replace("plot ", "film ")
        .replace(" was", " a")
        .replace("was ", "a ");
    std::fs::write(&dataset, text)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny-vocabulary", "model": model_dir,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "scheme": "int8"},
            {"type": "distill", "student_layers": 1, "layer_init": "last", "epochs": 4,
             "learning_rate": 0.003, "vocabulary": "task"},
            {"type": "quantize", "scheme": "int8"}
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
    let ignore = |_: Event| {};
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &ignore,
        &AtomicBool::new(false),
    )?;
    let report = &result.report;
    let vocabulary = &report.stages[2].details["vocabulary"];
    assert_eq!(vocabulary["tokens_before"], 14);
    assert_eq!(vocabulary["tokens_kept"], 12);
    assert!(vocabulary["parameters_after"].as_u64() < vocabulary["parameters_before"].as_u64());
    for stage in &report.stages[2..] {
        let accuracy = stage.metrics.accuracy.unwrap();
        assert!(accuracy > 0.9, "{}: {accuracy}", stage.label);
    }

    // The saved student (and the quantized one after it) carry the renumbered tokenizer.
    for saved in [out.join("stages/2-distill/model"), result.final_dir.clone()] {
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(saved.join("config.json"))?)?;
        assert_eq!(config["vocab_size"], 12);
        let tokenizer = tokenizers::Tokenizer::from_file(saved.join("tokenizer.json"))
            .map_err(anyhow::Error::msg)?;
        assert_eq!(tokenizer.get_vocab_size(true), 12);
        // "was" (13) is gone: [UNK] (1); the kept tokens were ids 0 to 11 and keep them.
        let ids = tokenizer
            .encode("the film was great a", true)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec();
        assert_eq!(ids, [2, 10, 9, 1, 7, 11, 3]);
    }

    // A resumed job loads the trimmed student and reads its data in the student's vocabulary.
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let student_dir = out.join("stages/2-distill/model");
    let reloaded = session.load_saved(&student_dir)?;
    let again = session.evaluate(&reloaded, &student_dir)?;
    assert_eq!(again.accuracy, report.stages[2].metrics.accuracy);
    Ok(())
}

#[test]
fn vocabulary_trimming_is_refused_for_language_models_at_submission() -> Result<()> {
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "lm", "model": "m", "task": {"type": "language_modeling", "dataset": "d"},
        "pipeline": [{"type": "distill", "student_layers": 1, "vocabulary": "task"}]
    }))?;
    let violations = spec.validate();
    assert_eq!(violations.len(), 1, "{violations:?}");
    let text = format!("{violations:?}");
    assert!(text.contains("WordPiece"), "{text}");
    Ok(())
}

#[test]
#[ignore = "needs transformers: COMPRESSD_INTEROP_PYTHON=/root/.cache/compressd-pyenv/bin/python cargo test -p compressd-engine --test pipeline -- --ignored vocabulary::tiny_"]
/// A student with a trimmed vocabulary and a narrower hidden size loads in transformers.
fn tiny_trimmed_student_loads_in_transformers_with_its_own_tokenizer() -> Result<()> {
    use crate::interop::{assert_loaded_and_agrees, classifier_logits, transformers_compare};
    use compressd_engine::data::TextEncoder;

    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_model(&model_dir)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let text = std::fs::read_to_string(&dataset)?.replace("plot", "film");
    std::fs::write(&dataset, &text)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny-vocabulary-interop", "model": model_dir,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 2, "learning_rate": 0.003, "batch_size": 16},
            {"type": "distill", "student_layers": 1, "epochs": 2, "learning_rate": 0.003,
             "vocabulary": "task", "hidden_size": 16}
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.5}
    }))?;
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
    let final_dir = result.final_dir;
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let student = session.load_saved(&final_dir)?;
    assert_eq!(student.config["vocab_size"], 13);
    // Also narrower in its hidden size (32 → 16, 2 heads of the teacher's size 8).
    assert_eq!(student.config["hidden_size"], 16);

    // The engine's logits on the ids of the folder's own (renumbered) tokenizer; transformers
    // tokenizes the same texts with AutoTokenizer on the folder, as a user would.
    let texts: Vec<String> = text
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter(|r| r["split"] == "test")
        .filter_map(|r| r["text"].as_str().map(str::to_owned))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoder = TextEncoder::from_file(&final_dir.join("tokenizer.json"), 128)?;
    let rows = encoder.encode_all(&refs)?;
    let logits = classifier_logits(&student, &rows)?;
    let request = serde_json::json!({
        "model_dir": final_dir, "task": "sequence_classification",
        "rows": rows.iter().zip(&logits)
            .map(|(ids, l)| serde_json::json!({"input_ids": ids, "logits": l}))
            .collect::<Vec<_>>(),
        "tokenize": {"texts": texts, "max_length": 128},
    });
    let compared = transformers_compare(&request)?;
    assert_loaded_and_agrees(&compared, "BertForSequenceClassification", 0.99);
    assert_eq!(compared["token_agreement"], 1.0, "{compared}");
    let diff = compared["max_abs_logit_diff"].as_f64().unwrap_or(f64::MAX);
    assert!(diff < 1e-4, "logits differ by {diff}");
    Ok(())
}
