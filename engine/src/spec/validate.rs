//! Range and cross-field checks of a parsed [`JobSpec`], reported as JSON pointers.
//!
//! Stage fields and preconditions are each stage's own ([`super::StageKind`]); this module checks
//! the job's fields and walks the pipeline, passing each stage the model state the previous one
//! left.

use super::{
    Acceptance, Checker, DistillSpec, FinetuneMethod, FinetuneSpec, JobSpec, Metric, ModelState,
    OutputFormat, QuantScheme, QuantizeSpec, StageKind, StageSpec, TaskSpec, TaskType, Violation,
    IMPLEMENTED_STAGES, MAX_STAGES, MAX_WEBHOOKS,
};

const MAX_NAME_CHARS: usize = 128;
const MAX_SEQUENCE_LENGTH: u32 = 131_072;
const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;

pub(super) fn validate(spec: &JobSpec, input: &ModelState) -> Vec<Violation> {
    let mut c = Checker::new();
    let name_chars = spec.name.chars().count();
    c.check((1..=MAX_NAME_CHARS).contains(&name_chars), "/name", || {
        format!("must have 1 to {MAX_NAME_CHARS} characters, got {name_chars}")
    });
    c.check(!spec.name.chars().any(char::is_control), "/name", || {
        "must not contain control characters".to_owned()
    });
    c.check(!spec.model.trim().is_empty(), "/model", || {
        "must not be empty".to_owned()
    });
    check_task(&mut c, &spec.task);
    check_family(&mut c, spec.task.task_type, input);
    check_pipeline(&mut c, &spec.pipeline, input);
    if let Some(acceptance) = &spec.acceptance {
        check_acceptance(&mut c, acceptance, spec.task.task_type);
    }
    check_outputs(&mut c, spec);
    check_webhooks(&mut c, spec);
    if let Some(mlflow) = &spec.mlflow {
        for (name, pointer) in [
            (&mlflow.experiment, "/mlflow/experiment"),
            (&mlflow.registered_model, "/mlflow/registered_model"),
        ] {
            let Some(name) = name else { continue };
            let chars = name.chars().count();
            c.check(
                (1..=256).contains(&chars) && !name.chars().any(char::is_control),
                pointer,
                || format!("must have 1 to 256 characters and no control characters, got {chars}"),
            );
        }
    }
    c.check(PRIORITY_RANGE.contains(&spec.priority), "/priority", || {
        format!(
            "must be between {} and {}, got {}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end(),
            spec.priority
        )
    });
    c.into_violations()
}

/// The input model's family (when the registered model is known) must do the job's task.
fn check_family(c: &mut Checker, task: TaskType, input: &ModelState) {
    let Some(model_type) = &input.family else {
        return;
    };
    let config = serde_json::json!({ "model_type": model_type });
    if let Err(e) = crate::family::family_for_task(&config, task) {
        let message = match e {
            crate::EngineError::Unsupported(m) | crate::EngineError::InvalidModel(m) => m,
            other => other.to_string(),
        };
        c.fail("/task/type", message);
    }
}

fn check_task(c: &mut Checker, task: &TaskSpec) {
    c.check(!task.dataset.trim().is_empty(), "/task/dataset", || {
        "must not be empty".to_owned()
    });
    c.check(!task.text_field.is_empty(), "/task/text_field", || {
        "must not be empty".to_owned()
    });
    match (task.task_type, &task.label_field) {
        (TaskType::LanguageModeling, Some(_)) => c.fail(
            "/task/label_field",
            "language_modeling datasets are plain text and have no label field",
        ),
        (TaskType::TextClassification, Some(field)) if field.is_empty() => {
            c.fail("/task/label_field", "must not be empty")
        }
        _ => {}
    }
    if let Some(max_length) = task.max_length {
        c.range_u32(max_length, 1, MAX_SEQUENCE_LENGTH, "/task/max_length");
    }
    for (value, pointer) in [
        (task.max_train_samples, "/task/max_train_samples"),
        (task.max_eval_samples, "/task/max_eval_samples"),
    ] {
        c.check(value != Some(0), pointer, || {
            "must be at least 1 (or null for all)".to_owned()
        });
    }
}

fn check_pipeline(c: &mut Checker, pipeline: &[StageSpec], input: &ModelState) {
    if pipeline.is_empty() {
        c.fail("/pipeline", "must have at least one stage");
    }
    if pipeline.len() > MAX_STAGES {
        c.fail(
            "/pipeline",
            format!(
                "must have at most {MAX_STAGES} stages, got {}",
                pipeline.len()
            ),
        );
    }
    let mut model = input.clone();
    for (i, stage) in pipeline.iter().enumerate() {
        let at = format!("/pipeline/{i}");
        let stage_type = stage.type_name();
        if let Err(failed) = stage.preconditions(&model) {
            c.fail(
                format!("{at}/{}", failed.field.unwrap_or("type")),
                failed.message,
            );
        }
        stage.transform(&mut model, i);
        // A LoRA fine-tune merges into the same shapes; any other stage may change them.
        if stage_type != FinetuneSpec::TYPE {
            model.linear_modules = None;
        }
        if !stage.implemented() {
            c.fail(
                format!("{at}/type"),
                format!(
                    "stage `{stage_type}` is not implemented yet (implemented: {})",
                    IMPLEMENTED_STAGES.join(", ")
                ),
            );
        }
        stage.check(c, &at);
    }
}

fn check_acceptance(c: &mut Checker, a: &Acceptance, task: TaskType) {
    let fits_task = match a.metric {
        Metric::Accuracy | Metric::MacroF1 => task == TaskType::TextClassification,
        Metric::Perplexity => task == TaskType::LanguageModeling,
    };
    c.check(fits_task, "/acceptance/metric", || {
        format!("{:?} does not apply to a {task:?} task", a.metric)
    });
    match (a.max_drop, a.max_relative_drop) {
        (None, None) | (Some(_), Some(_)) => c.fail(
            "/acceptance",
            "give exactly one of max_drop and max_relative_drop",
        ),
        (Some(drop), None) => c.check(drop >= 0.0, "/acceptance/max_drop", || {
            format!("must be at least 0, got {drop}")
        }),
        (None, Some(drop)) => c.check(drop >= 0.0, "/acceptance/max_relative_drop", || {
            format!("must be at least 0, got {drop}")
        }),
    }
}

/// Whether the model a pipeline ends with is quantized with a scheme compressed-tensors stores.
fn compressed_tensors_fit(spec: &JobSpec) -> bool {
    let last_quantize = spec
        .pipeline
        .iter()
        .rposition(|s| s.get::<QuantizeSpec>().is_some());
    let Some(at) = last_quantize else {
        return false;
    };
    let fits = spec.pipeline[at]
        .get::<QuantizeSpec>()
        .is_some_and(|q| matches!(q.scheme, QuantScheme::Int8 | QuantScheme::Int4));
    fits && spec.pipeline[at + 1..]
        .iter()
        .all(|s| s.get::<DistillSpec>().is_none())
}

fn check_outputs(c: &mut Checker, spec: &JobSpec) {
    if let Some(i) = spec
        .outputs
        .iter()
        .position(|f| *f == OutputFormat::Adapter)
    {
        let lora = |s: &StageSpec| {
            s.get::<FinetuneSpec>()
                .is_some_and(|f| f.method == FinetuneMethod::Lora)
        };
        // The adapter applies to the model its stage started from; only the job's input model is
        // one a user has, and any later stage changes the weights it was trained against.
        c.check(
            spec.pipeline.len() == 1 && spec.pipeline.iter().all(lora),
            &format!("/outputs/{i}"),
            || {
                "an adapter output needs a pipeline of one `finetune` with `method: \"lora\"` \
                 (the adapter applies to the input model; later stages change the weights it was \
                 trained against, earlier ones the base it applies to); ask for \"safetensors\" \
                 to get the merged model of a longer pipeline"
                    .to_owned()
            },
        );
    }
    if let Some(i) = spec
        .outputs
        .iter()
        .position(|f| *f == OutputFormat::CompressedTensors)
    {
        c.check(compressed_tensors_fit(spec), &format!("/outputs/{i}"), || {
            "the compressed-tensors layout stores int8 per channel and int4 per group: it needs a \
             `quantize` stage with scheme \"int8\" or \"int4\" whose model the pipeline ends with \
             (no `distill` after it, whose student starts in full precision)"
                .to_owned()
        });
    }
    if spec.outputs.is_empty() && !spec.dry_run {
        c.fail("/outputs", "must name at least one format");
    }
    for (i, format) in spec.outputs.iter().enumerate() {
        if spec.outputs[..i].contains(format) {
            c.fail(
                format!("/outputs/{i}"),
                format!("{format:?} is listed twice"),
            );
        }
    }
}

/// Counts and shapes only: whether a URL may be reached is the service's network policy.
fn check_webhooks(c: &mut Checker, spec: &JobSpec) {
    c.check(spec.webhooks.len() <= MAX_WEBHOOKS, "/webhooks", || {
        format!(
            "at most {MAX_WEBHOOKS} webhooks, got {}",
            spec.webhooks.len()
        )
    });
    for (i, webhook) in spec.webhooks.iter().enumerate() {
        c.check(
            !webhook.events.is_empty(),
            &format!("/webhooks/{i}/events"),
            || "must name at least one event (leave it out for the terminal ones)".to_owned(),
        );
        c.check(
            (1..=2048).contains(&webhook.url.len()),
            &format!("/webhooks/{i}/url"),
            || "must have 1 to 2048 characters".to_owned(),
        );
    }
}
