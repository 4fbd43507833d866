//! Turning a JSON document (an API request body or a spec file) into a validated [`JobSpec`], every
//! failure a [`Violation`] with the JSON pointer of the offending field.

use compressd_engine::spec::{JobSpec, StageSpec, Violation, STAGE_TYPES};
use serde_json::Value;
use serde_path_to_error::{Path, Segment, Track};

/// Parses, fills defaults and validates a spec.
///
/// # Errors
/// The violations: the first type error serde finds, or every range and rule failure.
pub fn accept(body: &Value) -> Result<JobSpec, Vec<Violation>> {
    let mut spec = parse(body).map_err(|v| vec![v])?;
    spec.fill_defaults();
    let violations = spec.validate();
    if violations.is_empty() {
        Ok(spec)
    } else {
        Err(violations)
    }
}

/// Deserializes with path tracking.
fn parse(body: &Value) -> Result<JobSpec, Violation> {
    let error = match serde_path_to_error::deserialize::<_, JobSpec>(body) {
        Ok(spec) => return Ok(spec),
        Err(error) => error,
    };
    // serde buffers internally tagged stages, so the tracked path stops at the stage: parse the
    // failing stage alone, by its type, to find the field inside it.
    if let Some(index) = stage_index(error.path()) {
        if let Some(violation) = stage_violation(body, index) {
            return Err(violation);
        }
    }
    Err(violation_at(
        pointer(error.path()),
        &error.into_inner().to_string(),
    ))
}

/// The pipeline index the path is in, if any.
fn stage_index(path: &Path) -> Option<usize> {
    let mut segments = path.iter();
    match (segments.next(), segments.next()) {
        (Some(Segment::Map { key }), Some(Segment::Seq { index })) if key == "pipeline" => {
            Some(*index)
        }
        _ => None,
    }
}

/// Re-parses stage `index` alone; `None` if it parses (the error was elsewhere).
fn stage_violation(body: &Value, index: usize) -> Option<Violation> {
    let at = format!("/pipeline/{index}");
    let stage = body.pointer(&at)?;
    let Some(object) = stage.as_object() else {
        return Some(violation_at(at, "must be an object with a `type`"));
    };
    let stage_type = match object.get("type") {
        None => return Some(violation_at(format!("{at}/type"), "missing field `type`")),
        Some(Value::String(stage_type)) => stage_type,
        Some(_) => return Some(violation_at(format!("{at}/type"), "must be a string")),
    };
    if !STAGE_TYPES.contains(&stage_type.as_str()) {
        let message = format!(
            "unknown stage type `{stage_type}` (known: {})",
            STAGE_TYPES.join(", ")
        );
        return Some(violation_at(format!("{at}/type"), &message));
    }
    let mut fields = object.clone();
    fields.remove("type");
    let fields = Value::Object(fields);
    let mut track = Track::new();
    let result = StageSpec::deserialize_typed(
        stage_type,
        serde_path_to_error::Deserializer::new(&fields, &mut track),
    );
    let error = result.err()?;
    Some(violation_at(
        format!("{at}{}", pointer(&track.path())),
        &error.to_string(),
    ))
}

/// A violation at `pointer`; "missing field" and "unknown field" errors point at the field itself,
/// not at the object holding it.
fn violation_at(pointer: String, message: &str) -> Violation {
    let field = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    let pointer = match field {
        Some(field) if !pointer.ends_with(&format!("/{}", escape(field))) => {
            format!("{pointer}/{}", escape(field))
        }
        _ => pointer,
    };
    Violation {
        pointer,
        message: message.to_owned(),
    }
}

/// RFC 6901 pointer of a serde path.
fn pointer(path: &Path) -> String {
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(format!("/{index}")),
            Segment::Map { key } => Some(format!("/{}", escape(key))),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body() -> Value {
        json!({
            "name": "n", "model": "m",
            "task": {"type": "text_classification", "dataset": "d"},
            "pipeline": [{"type": "finetune", "epochs": 1}, {"type": "finetune"}]
        })
    }

    fn first_pointer(body: &Value) -> String {
        accept(body).unwrap_err()[0].pointer.clone()
    }

    #[test]
    fn a_valid_body_is_accepted() {
        assert!(accept(&body()).is_ok());
    }

    #[test]
    fn wrong_types_inside_a_stage_point_at_the_field() {
        let mut b = body();
        b["pipeline"][1]["epochs"] = json!("two");
        assert_eq!(first_pointer(&b), "/pipeline/1/epochs");
        b["pipeline"][1] = json!({"type": "finetune", "grad_clip": {"max_norm": "x"}});
        assert_eq!(first_pointer(&b), "/pipeline/1/grad_clip/max_norm");
    }

    #[test]
    fn unknown_and_missing_fields_point_at_the_field() {
        let mut b = body();
        b["pipeline"][0]["colour"] = json!(1);
        assert_eq!(first_pointer(&b), "/pipeline/0/colour");
        let mut b = body();
        b["task"]["colour"] = json!(1);
        assert_eq!(first_pointer(&b), "/task/colour");
        let mut b = body();
        b.as_object_mut().unwrap().remove("model");
        assert_eq!(first_pointer(&b), "/model");
        let mut b = body();
        b["pipeline"][1] = json!({"type": "prune"});
        assert_eq!(first_pointer(&b), "/pipeline/1/sparsity");
    }

    #[test]
    fn bad_stage_types_point_at_type() {
        let mut b = body();
        b["pipeline"][0] = json!({"type": "shrink"});
        assert_eq!(first_pointer(&b), "/pipeline/0/type");
        b["pipeline"][0] = json!({"epochs": 1});
        assert_eq!(first_pointer(&b), "/pipeline/0/type");
    }

    #[test]
    fn top_level_type_errors_point_at_the_field() {
        let mut b = body();
        b["seed"] = json!(-1);
        assert_eq!(first_pointer(&b), "/seed");
        let mut b = body();
        b["task"]["type"] = json!("translation");
        assert_eq!(first_pointer(&b), "/task/type");
    }

    #[test]
    fn keys_are_escaped() {
        let mut b = body();
        b["a/b~c"] = json!(1);
        assert_eq!(first_pointer(&b), "/a~1b~0c");
    }
}
