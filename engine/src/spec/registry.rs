//! The registry of stage kinds: parsing a stage by its `type`, the list of stage types, and the
//! job spec's JSON Schema all come from one list of [`StageDescriptor`]s
//! ([`crate::stages::STAGES`]), so one line there adds a stage everywhere.

use std::sync::LazyLock;

use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde::de::Error as _;
use serde::Deserializer;
use serde_json::{json, Value};

use super::stage::{StageKind, StageSpec};
use super::JobSpec;

/// Parses a stage body of one kind from a type-erased deserializer.
type DeserializeFn = for<'a, 'de> fn(
    &'a mut dyn erased_serde::Deserializer<'de>,
) -> Result<StageSpec, erased_serde::Error>;

/// What the registry knows of one stage kind, made by [`StageDescriptor::of`].
#[derive(Clone, Copy)]
pub struct StageDescriptor {
    /// The stage's `type` tag.
    pub type_name: &'static str,
    /// Whether the engine runs it.
    pub implemented: bool,
    deserialize: DeserializeFn,
    schema: fn(&mut SchemaGenerator) -> Schema,
}

impl std::fmt::Debug for StageDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageDescriptor")
            .field("type_name", &self.type_name)
            .field("implemented", &self.implemented)
            .finish_non_exhaustive()
    }
}

impl StageDescriptor {
    /// The descriptor of stage kind `T`: the registry line that adds it.
    pub const fn of<T: StageKind>() -> Self {
        Self {
            type_name: T::TYPE,
            implemented: T::IMPLEMENTED,
            deserialize: deserialize_kind::<T>,
            schema: tagged_schema::<T>,
        }
    }
}

fn deserialize_kind<T: StageKind>(
    deserializer: &mut dyn erased_serde::Deserializer<'_>,
) -> Result<StageSpec, erased_serde::Error> {
    erased_serde::deserialize::<T>(deserializer).map(StageSpec::new)
}

/// The schema of `T`'s body with its `type` tag added as a required constant.
fn tagged_schema<T: StageKind>(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = T::json_schema(generator);
    let object = schema.ensure_object();
    let mut tag = json!({"type": "string", "const": T::TYPE});
    if !T::IMPLEMENTED {
        tag["description"] = json!("Not implemented yet: a job with this stage is refused.");
    }
    let mut properties = match object.remove("properties") {
        Some(Value::Object(properties)) => properties,
        _ => serde_json::Map::new(),
    };
    properties.insert("type".into(), tag);
    object.insert("properties".into(), Value::Object(properties));
    let mut required = vec![json!("type")];
    if let Some(Value::Array(fields)) = object.remove("required") {
        required.extend(fields);
    }
    object.insert("required".into(), Value::Array(required));
    object.insert("title".into(), json!(T::TYPE));
    schema
}

/// The `type` names of `stages` (only the implemented ones when `implemented_only`), as a
/// compile-time array of length `N` (see [`count`]).
pub const fn type_names<const N: usize>(
    stages: &[StageDescriptor],
    implemented_only: bool,
) -> [&'static str; N] {
    let mut names = [""; N];
    let (mut i, mut n) = (0, 0);
    while i < stages.len() {
        if !implemented_only || stages[i].implemented {
            names[n] = stages[i].type_name;
            n += 1;
        }
        i += 1;
    }
    names
}

/// How many of `stages` there are (only the implemented ones when `implemented_only`).
pub const fn count(stages: &[StageDescriptor], implemented_only: bool) -> usize {
    let (mut i, mut n) = (0, 0);
    while i < stages.len() {
        if !implemented_only || stages[i].implemented {
            n += 1;
        }
        i += 1;
    }
    n
}

/// A list of stage kinds; [`Registry::standard`] is the one the engine and service use.
#[derive(Clone, Debug)]
pub struct Registry {
    stages: Vec<StageDescriptor>,
}

static STANDARD: LazyLock<Registry> = LazyLock::new(|| Registry::new(crate::stages::STAGES));

impl Registry {
    /// A registry of `stages`, in the order the schema lists them.
    pub fn new(stages: &[StageDescriptor]) -> Self {
        Self {
            stages: stages.to_vec(),
        }
    }

    /// The registry of [`crate::stages::STAGES`].
    pub fn standard() -> &'static Registry {
        &STANDARD
    }

    /// This registry plus one stage kind (replacing a kind of the same `type`).
    #[must_use]
    pub fn with(mut self, stage: StageDescriptor) -> Self {
        self.stages.retain(|s| s.type_name != stage.type_name);
        self.stages.push(stage);
        self
    }

    /// The stage kinds, in order.
    pub fn stages(&self) -> &[StageDescriptor] {
        &self.stages
    }

    /// The descriptor of `stage_type`.
    pub fn get(&self, stage_type: &str) -> Option<&StageDescriptor> {
        self.stages.iter().find(|s| s.type_name == stage_type)
    }

    /// Deserializes the body of a stage (without its `type` key) of kind `stage_type`.
    ///
    /// # Errors
    /// The deserializer's error for an unknown type or a body that does not match it.
    pub fn deserialize_typed<'de, D: Deserializer<'de>>(
        &self,
        stage_type: &str,
        deserializer: D,
    ) -> Result<StageSpec, D::Error> {
        let Some(stage) = self.get(stage_type) else {
            let known: Vec<String> = self
                .stages
                .iter()
                .map(|s| format!("`{}`", s.type_name))
                .collect();
            return Err(D::Error::custom(format!(
                "unknown variant `{stage_type}`, expected one of {}",
                known.join(", ")
            )));
        };
        let mut erased = <dyn erased_serde::Deserializer>::erase(deserializer);
        (stage.deserialize)(&mut erased).map_err(D::Error::custom)
    }

    /// Parses a whole stage object (`type` and fields).
    ///
    /// # Errors
    /// When `value` is not an object with a string `type` of this registry, or its fields do not
    /// match that kind.
    pub fn parse_stage(&self, value: &Value) -> serde_json::Result<StageSpec> {
        let mut fields = value
            .as_object()
            .cloned()
            .ok_or_else(|| serde_json::Error::custom("a stage must be an object with a `type`"))?;
        let stage_type = match fields.remove("type") {
            Some(Value::String(stage_type)) => stage_type,
            Some(_) => return Err(serde_json::Error::custom("`type` must be a string")),
            None => return Err(serde_json::Error::missing_field("type")),
        };
        self.deserialize_typed(&stage_type, Value::Object(fields))
    }

    /// The schema of one pipeline stage: one of the registered kinds, each tagged by `type`.
    pub fn stage_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        let kinds: Vec<Value> = self
            .stages
            .iter()
            .map(|s| (s.schema)(generator).to_value())
            .collect();
        Schema::from(
            json!({"description": "One step of a job pipeline, chosen by `type`.", "oneOf": kinds})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// The JSON Schema (2020-12) of the job spec with this registry's stages; subschemas are
    /// placed and referenced at `definitions_path` (`/$defs`, or `/components/schemas` for
    /// OpenAPI).
    pub fn job_spec_schema(&self, definitions_path: &str) -> Value {
        let mut generator = SchemaSettings::draft2020_12()
            .with(|s| s.definitions_path = definitions_path.to_owned().into())
            .into_generator();
        let stages = self.stage_schema(&mut generator).to_value();
        generator
            .definitions_mut()
            .insert("StageSpec".into(), stages);
        generator.into_root_schema_for::<JobSpec>().to_value()
    }
}
