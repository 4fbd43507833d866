//! Range and cross-field checks of a parsed [`JobSpec`], reported as JSON pointers.

use super::{
    Acceptance, DistillSpec, FinetuneSpec, JobSpec, Metric, PrunePattern, PruneSpec, QuantScheme,
    QuantizeSpec, Recover, StageSpec, TaskSpec, TaskType, Violation, IMPLEMENTED_STAGES,
    MAX_STAGES,
};

const MAX_NAME_CHARS: usize = 128;
const MAX_EPOCHS: u32 = 1000;
const MAX_BATCH_SIZE: u32 = 4096;
const MAX_SEQUENCE_LENGTH: u32 = 131_072;
const MAX_PRUNE_STEPS: u32 = 100;
/// Above this, magnitude pruning leaves too little of a layer to recover.
const MAX_SPARSITY: f64 = 0.95;
const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;
const INT4_GROUP_SIZES: &[u32] = &[32, 64, 128];

/// Collects violations under a pointer prefix.
struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    fn fail(&mut self, pointer: impl Into<String>, message: impl Into<String>) {
        self.violations.push(Violation {
            pointer: pointer.into(),
            message: message.into(),
        });
    }

    fn check(&mut self, ok: bool, pointer: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(pointer, message());
        }
    }

    fn range_u32(&mut self, value: u32, min: u32, max: u32, pointer: &str) {
        self.check((min..=max).contains(&value), pointer, || {
            format!("must be between {min} and {max}, got {value}")
        });
    }

    /// A learning rate: positive and at most 1 (anything above diverges for the optimizers we run).
    fn learning_rate(&mut self, value: f64, pointer: &str) {
        self.check(value > 0.0 && value <= 1.0, pointer, || {
            format!("must be in (0, 1], got {value}")
        });
    }

    fn unit_interval(&mut self, value: f64, pointer: &str, open_top: bool) {
        let ok = value >= 0.0 && if open_top { value < 1.0 } else { value <= 1.0 };
        let top = if open_top { ")" } else { "]" };
        self.check(ok, pointer, || {
            format!("must be in [0, 1{top}, got {value}")
        });
    }

    fn globs(&mut self, globs: &[String], pointer: &str) {
        for (i, glob) in globs.iter().enumerate() {
            self.check(!glob.trim().is_empty(), &format!("{pointer}/{i}"), || {
                "must not be empty".to_owned()
            });
        }
    }
}

pub(super) fn validate(spec: &JobSpec) -> Vec<Violation> {
    let mut c = Checker {
        violations: Vec::new(),
    };
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
    check_pipeline(&mut c, &spec.pipeline);
    if let Some(acceptance) = &spec.acceptance {
        check_acceptance(&mut c, acceptance, spec.task.task_type);
    }
    check_outputs(&mut c, spec);
    c.check(PRIORITY_RANGE.contains(&spec.priority), "/priority", || {
        format!(
            "must be between {} and {}, got {}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end(),
            spec.priority
        )
    });
    c.violations
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

fn check_pipeline(c: &mut Checker, pipeline: &[StageSpec]) {
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
    let mut quantized_at: Option<usize> = None;
    for (i, stage) in pipeline.iter().enumerate() {
        let at = format!("/pipeline/{i}");
        let stage_type = stage.type_name();
        if let Some(q) = quantized_at {
            c.fail(
                format!("{at}/type"),
                format!("`{stage_type}` cannot follow the post-training `quantize` at /pipeline/{q}: quantized weights cannot be trained, pruned or re-quantized; move it before"),
            );
        }
        if matches!(stage, StageSpec::Quantize(_)) {
            quantized_at.get_or_insert(i);
        }
        if !IMPLEMENTED_STAGES.contains(&stage_type) {
            c.fail(
                format!("{at}/type"),
                format!(
                    "stage `{stage_type}` is not implemented yet (implemented: {})",
                    IMPLEMENTED_STAGES.join(", ")
                ),
            );
        }
        match stage {
            StageSpec::Finetune(s) => check_finetune(c, s, &at),
            StageSpec::Prune(s) => check_prune(c, s, &at),
            StageSpec::Quantize(s) => check_quantize(c, s, &at),
            StageSpec::Distill(s) => check_distill(c, s, &at),
        }
    }
}

fn check_finetune(c: &mut Checker, s: &FinetuneSpec, at: &str) {
    c.range_u32(s.epochs, 1, MAX_EPOCHS, &format!("{at}/epochs"));
    c.learning_rate(s.learning_rate, &format!("{at}/learning_rate"));
    if let Some(rate) = s.head_learning_rate {
        c.learning_rate(rate, &format!("{at}/head_learning_rate"));
    }
    c.range_u32(s.batch_size, 1, MAX_BATCH_SIZE, &format!("{at}/batch_size"));
    c.unit_interval(s.weight_decay, &format!("{at}/weight_decay"), false);
    c.unit_interval(s.warmup_ratio, &format!("{at}/warmup_ratio"), true);
    c.globs(&s.freeze, &format!("{at}/freeze"));
    if let Some(clip) = &s.grad_clip {
        c.check(
            clip.max_norm > 0.0,
            &format!("{at}/grad_clip/max_norm"),
            || format!("must be positive, got {}", clip.max_norm),
        );
    }
    if let Some(stop) = &s.early_stopping {
        c.range_u32(
            stop.patience,
            1,
            MAX_EPOCHS,
            &format!("{at}/early_stopping/patience"),
        );
    }
}

fn check_recover(c: &mut Checker, r: &Recover, at: &str) {
    c.range_u32(r.epochs, 1, MAX_EPOCHS, &format!("{at}/epochs"));
    c.learning_rate(r.learning_rate, &format!("{at}/learning_rate"));
}

fn check_prune(c: &mut Checker, s: &PruneSpec, at: &str) {
    let sparsity_at = format!("{at}/sparsity");
    c.check(
        s.sparsity > 0.0 && s.sparsity <= MAX_SPARSITY,
        &sparsity_at,
        || format!("must be in (0, {MAX_SPARSITY}], got {}", s.sparsity),
    );
    if s.pattern == PrunePattern::TwoFour {
        c.check(s.sparsity == 0.5, &sparsity_at, || {
            format!("must be 0.5 with pattern 2:4, got {}", s.sparsity)
        });
    }
    c.range_u32(s.steps, 1, MAX_PRUNE_STEPS, &format!("{at}/steps"));
    if let Some(exclude) = &s.exclude {
        c.globs(exclude, &format!("{at}/exclude"));
    }
    if let Some(recover) = &s.recover {
        check_recover(c, recover, &format!("{at}/recover"));
    }
}

fn check_quantize(c: &mut Checker, s: &QuantizeSpec, at: &str) {
    if let Some(group) = s.group_size {
        let pointer = format!("{at}/group_size");
        if s.scheme == QuantScheme::Int4 {
            c.check(INT4_GROUP_SIZES.contains(&group), &pointer, || {
                format!("must be one of {INT4_GROUP_SIZES:?}, got {group}")
            });
        } else {
            c.fail(pointer, "only int4 takes a group size (the other schemes have fixed blocks or per-channel scales)");
        }
    }
    if let Some(exclude) = &s.exclude {
        c.globs(exclude, &format!("{at}/exclude"));
    }
    if let Some(qat) = &s.qat {
        check_recover(c, qat, &format!("{at}/qat"));
    }
}

fn check_distill(c: &mut Checker, s: &DistillSpec, at: &str) {
    if let Some(layers) = s.student_layers {
        c.range_u32(layers, 1, 1000, &format!("{at}/student_layers"));
    }
    c.range_u32(s.epochs, 1, MAX_EPOCHS, &format!("{at}/epochs"));
    c.learning_rate(s.learning_rate, &format!("{at}/learning_rate"));
    c.check(
        s.temperature > 0.0 && s.temperature <= 100.0,
        &format!("{at}/temperature"),
        || format!("must be in (0, 100], got {}", s.temperature),
    );
    c.unit_interval(s.alpha, &format!("{at}/alpha"), false);
    c.range_u32(s.batch_size, 1, MAX_BATCH_SIZE, &format!("{at}/batch_size"));
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

fn check_outputs(c: &mut Checker, spec: &JobSpec) {
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
