//! One pipeline step as the job spec holds it: any registered stage kind behind one type.
//!
//! A stage kind is one file under `engine/src/stages/` holding its spec type (serde, defaults,
//! JSON Schema), its checks, its preconditions on the incoming model, its dry-run estimate and its
//! run; [`StageKind`] is what that file implements, and one line of [`crate::stages::STAGES`]
//! registers it. On the wire a stage is its spec's fields plus a `type` tag.

use std::any::Any;
use std::fmt::Debug;

use schemars::JsonSchema;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::check::Checker;
use super::estimate::{Estimate, Workload};
use super::model_state::{ModelState, Precondition};
use super::registry::Registry;
use crate::error::Result;
use crate::stages::Stage;

/// Everything one kind of stage knows about itself.
pub trait StageKind:
    Serialize + DeserializeOwned + JsonSchema + Clone + Debug + PartialEq + Send + Sync + 'static
{
    /// The stage's `type` tag.
    const TYPE: &'static str;
    /// Whether the engine runs it; a stage the schema knows but the engine does not run yet is
    /// refused at submission with a clear message.
    const IMPLEMENTED: bool = true;

    /// Checks ranges and cross-field rules, recording violations under `at` (`/pipeline/<i>`).
    fn check(&self, c: &mut Checker, at: &str);

    /// Checks what the stage needs of the model it receives.
    ///
    /// # Errors
    /// The first precondition the model fails.
    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition>;

    /// The model as the stage leaves it (quantized, pruned…); `index` is the stage's position.
    fn transform(&self, _model: &mut ModelState, _index: usize) {}

    /// Whether the stage fits the model to the task (its input may have an untrained head), so
    /// that quality is judged against the last such stage that leads the pipeline.
    fn fits_task(&self) -> bool {
        false
    }

    /// The dry run's time and memory estimate.
    fn estimate(&self, work: &Workload) -> Estimate;

    /// Checks that the stage can run on `device`, for settings offered on some devices only; the
    /// job checks every stage before the first one runs.
    ///
    /// # Errors
    /// [`crate::EngineError::InvalidSetting`] naming the setting (relative to the stage).
    fn check_device(&self, _device: &candle_core::Device) -> Result<()> {
        Ok(())
    }

    /// The engine stage that runs this spec.
    ///
    /// # Errors
    /// [`crate::EngineError::Unsupported`] for a stage or option the engine does not run.
    fn build(&self) -> Result<Box<dyn Stage>>;
}

/// The object-safe face of [`StageKind`], implemented for every kind.
trait AnyStage: Debug + Send + Sync {
    fn type_name(&self) -> &'static str;
    fn implemented(&self) -> bool;
    fn body(&self) -> serde_json::Result<serde_json::Value>;
    fn check(&self, c: &mut Checker, at: &str);
    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition>;
    fn transform(&self, model: &mut ModelState, index: usize);
    fn fits_task(&self) -> bool;
    fn estimate(&self, work: &Workload) -> Estimate;
    fn check_device(&self, device: &candle_core::Device) -> Result<()>;
    fn build(&self) -> Result<Box<dyn Stage>>;
    fn clone_box(&self) -> Box<dyn AnyStage>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: StageKind> AnyStage for T {
    fn type_name(&self) -> &'static str {
        T::TYPE
    }
    fn implemented(&self) -> bool {
        T::IMPLEMENTED
    }
    fn body(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::to_value(self)
    }
    fn check(&self, c: &mut Checker, at: &str) {
        StageKind::check(self, c, at);
    }
    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        StageKind::preconditions(self, model)
    }
    fn transform(&self, model: &mut ModelState, index: usize) {
        StageKind::transform(self, model, index);
    }
    fn fits_task(&self) -> bool {
        StageKind::fits_task(self)
    }
    fn estimate(&self, work: &Workload) -> Estimate {
        StageKind::estimate(self, work)
    }
    fn check_device(&self, device: &candle_core::Device) -> Result<()> {
        StageKind::check_device(self, device)
    }
    fn build(&self) -> Result<Box<dyn Stage>> {
        StageKind::build(self)
    }
    fn clone_box(&self) -> Box<dyn AnyStage> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// One step of a job pipeline: a registered stage kind's spec, tagged by `type` on the wire.
#[derive(Debug)]
pub struct StageSpec(Box<dyn AnyStage>);

impl StageSpec {
    /// Wraps a stage kind's spec.
    pub fn new<T: StageKind>(spec: T) -> Self {
        Self(Box::new(spec))
    }

    /// The stage's `type` tag.
    pub fn type_name(&self) -> &'static str {
        self.0.type_name()
    }

    /// Whether the engine runs this kind of stage.
    pub fn implemented(&self) -> bool {
        self.0.implemented()
    }

    /// Checks that the stage can run on `device` ([`StageKind::check_device`]).
    ///
    /// # Errors
    /// A setting the device does not offer.
    pub fn check_device(&self, device: &candle_core::Device) -> Result<()> {
        self.0.check_device(device)
    }

    /// The typed spec, when the stage is of kind `T`.
    pub fn get<T: StageKind>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }

    /// The typed spec, mutable, when the stage is of kind `T` (filling defaults).
    pub fn get_mut<T: StageKind>(&mut self) -> Option<&mut T> {
        self.0.as_any_mut().downcast_mut()
    }

    /// Checks ranges and cross-field rules under `at` (`/pipeline/<i>`).
    pub fn check(&self, c: &mut Checker, at: &str) {
        self.0.check(c, at);
    }

    /// Checks what the stage needs of the model it receives.
    ///
    /// # Errors
    /// The first precondition the model fails.
    pub fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        self.0.preconditions(model)
    }

    /// The model as the stage at `index` leaves it.
    pub fn transform(&self, model: &mut ModelState, index: usize) {
        self.0.transform(model, index);
    }

    /// Whether the stage fits the model to the task (see [`StageKind::fits_task`]).
    pub fn fits_task(&self) -> bool {
        self.0.fits_task()
    }

    /// The dry run's estimate for this stage.
    pub fn estimate(&self, work: &Workload) -> Estimate {
        self.0.estimate(work)
    }

    /// The engine stage that runs this spec.
    ///
    /// # Errors
    /// [`crate::EngineError::Unsupported`] for a stage or option the engine does not run.
    pub fn build(&self) -> Result<Box<dyn Stage>> {
        if !self.implemented() {
            return Err(crate::EngineError::Unsupported(format!(
                "stage `{}` is not implemented",
                self.type_name()
            )));
        }
        self.0.build()
    }

    /// Deserializes the body of a stage (the object without its `type` key) whose type is known.
    ///
    /// serde buffers a tagged stage before picking its kind, which hides the path of an error inside
    /// a stage from path-tracking deserializers. Callers that need the exact field (the API's JSON
    /// pointers) read `type` first, remove it, and call this with their tracking deserializer.
    ///
    /// # Errors
    /// The deserializer's error when `stage_type` is not a registered stage or the body does not
    /// match it.
    pub fn deserialize_typed<'de, D: Deserializer<'de>>(
        stage_type: &str,
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        Registry::standard().deserialize_typed(stage_type, deserializer)
    }
}

impl Clone for StageSpec {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}

impl PartialEq for StageSpec {
    fn eq(&self, other: &Self) -> bool {
        self.type_name() == other.type_name()
            && matches!((self.0.body(), other.0.body()), (Ok(a), Ok(b)) if a == b)
    }
}

impl Serialize for StageSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let body = self.0.body().map_err(S::Error::custom)?;
        let serde_json::Value::Object(fields) = body else {
            return Err(S::Error::custom(format!(
                "stage `{}` does not serialize to an object",
                self.type_name()
            )));
        };
        let tag = ("type".to_owned(), serde_json::Value::from(self.type_name()));
        serializer.collect_map(std::iter::once(tag).chain(fields))
    }
}

impl<'de> Deserialize<'de> for StageSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let mut fields = serde_json::Map::deserialize(deserializer)?;
        let stage_type = match fields.remove("type") {
            Some(serde_json::Value::String(stage_type)) => stage_type,
            Some(other) => {
                return Err(D::Error::invalid_type(
                    serde::de::Unexpected::Other(&other.to_string()),
                    &"a stage type name",
                ))
            }
            None => return Err(D::Error::missing_field("type")),
        };
        Registry::standard()
            .deserialize_typed(&stage_type, serde_json::Value::Object(fields))
            .map_err(D::Error::custom)
    }
}

impl JsonSchema for StageSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StageSpec".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        Registry::standard().stage_schema(generator)
    }
}
