//! A trivial stage kind added from outside the engine, through this one file and one registry
//! line (in the tests beside it): it proves that the schema, the dry-run estimate and submission
//! checks pick a new stage up with no other edit.

use compressd_engine::pipeline::StageContext;
use compressd_engine::spec::{Checker, Estimate, ModelState, Precondition, StageKind, Workload};
use compressd_engine::stages::{Stage, Trainer, WorkingModel};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Settings of a stage that only evaluates the model, `passes` times.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoopSpec {
    /// Evaluation passes, 1 to 10.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10))]
    pub passes: u32,
}

fn one() -> u32 {
    1
}

impl StageKind for NoopSpec {
    const TYPE: &'static str = "noop";

    fn check(&self, c: &mut Checker, at: &str) {
        c.range_u32(self.passes, 1, 10, &format!("{at}/passes"));
    }

    fn preconditions(&self, model: &ModelState) -> Result<(), Precondition> {
        model.require_full_precision(Self::TYPE)
    }

    fn estimate(&self, work: &Workload) -> Estimate {
        Estimate {
            seconds: f64::from(self.passes) * work.evaluation_seconds(),
            peak_bytes: work.inference_peak_bytes(),
        }
    }

    fn build(&self) -> compressd_engine::Result<Box<dyn Stage>> {
        Ok(Box::new(NoopStage))
    }
}

/// The stage: leaves the model as it is.
struct NoopStage;

impl Stage for NoopStage {
    fn name(&self) -> &'static str {
        NoopSpec::TYPE
    }

    fn validate(&self, _model: &WorkingModel) -> compressd_engine::Result<()> {
        Ok(())
    }

    fn run(
        &self,
        _model: &mut WorkingModel,
        _trainer: &dyn Trainer,
        _ctx: &StageContext,
    ) -> compressd_engine::Result<serde_json::Value> {
        Ok(serde_json::json!({}))
    }
}
