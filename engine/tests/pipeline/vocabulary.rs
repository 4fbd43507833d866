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
