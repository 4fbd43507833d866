//! LoRAPrune (`prune` with `importance: "lora"`) on the tiny BERT keyword task: scores come from
//! LoRA adapters and their gradients with no gradient of the frozen base, a dead head and a dead
//! neuron are cut first, recovery trains adapters, and the merged model shrinks and reloads.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use compressd_engine::objective::Objective;
use compressd_engine::params::Param;
use compressd_engine::pipeline::{PipelineInputs, StageContext, Workbench};
use compressd_engine::spec::{JobSpec, ModelState, StageSpec, TaskType};
use compressd_engine::stages::{
    build, run_job, Session, TrainRequest, TrainSettings, TrainSummary, Trainer, WorkingModel,
};
use compressd_engine::train::GradientObserver;
use serde_json::{json, Value};

use crate::tiny_task::{write_data, write_model};

/// The tiny model and data, and a session over them.
fn tiny(dir: &Path, pipeline: Value) -> Result<(JobSpec, PipelineInputs)> {
    let model = dir.join("model");
    write_model(&model)?;
    let dataset = dir.join("data.jsonl");
    write_data(&dataset)?;
    let spec = serde_json::from_value(json!({
        "name": "tiny-loraprune", "model": model, "seed": 5,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": pipeline, "acceptance": {"metric": "accuracy", "max_drop": 0.5}
    }))?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    Ok((spec, inputs))
}

/// A session that checks every calibration batch's gradients: the adapters get one, and the
/// frozen base weights get one exactly when `base_gradient` says they should.
struct GradientCheck<'a> {
    session: &'a Session,
    base_gradient: bool,
    batches: Cell<usize>,
}

struct CheckObserver<'a, 'b> {
    inner: &'b mut dyn GradientObserver,
    base: Vec<(String, Tensor)>,
    base_gradient: bool,
    batches: &'a Cell<usize>,
}

impl GradientObserver for CheckObserver<'_, '_> {
    fn observe(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
    ) -> compressd_engine::Result<()> {
        for (name, tensor) in &self.base {
            assert_eq!(
                grads.get(tensor).is_some(),
                self.base_gradient,
                "{name}'s gradient"
            );
        }
        for (name, var) in vars.iter().filter(|(n, _)| n.contains(".lora_B.")) {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "{name} has no gradient"
            );
        }
        self.batches.set(self.batches.get() + 1);
        self.inner.observe(vars, grads)
    }
}

impl Trainer for GradientCheck<'_> {
    fn train_with(
        &self,
        model: &mut WorkingModel,
        settings: &TrainSettings,
        request: TrainRequest<'_>,
        ctx: &StageContext,
    ) -> compressd_engine::Result<TrainSummary> {
        self.session.train_with(model, settings, request, ctx)
    }

    fn observe_gradients(
        &self,
        model: &WorkingModel,
        batches: usize,
        batch_size: usize,
        objective: Option<&dyn Objective>,
        observer: &mut dyn GradientObserver,
    ) -> compressd_engine::Result<usize> {
        // The attention and FFN weights of the encoder: the base LoRAPrune must not differentiate.
        let base: Vec<(String, Tensor)> = model
            .store
            .tensors()
            .into_iter()
            .filter(|(n, _)| n.starts_with("encoder.") && n.ends_with("dense.weight"))
            .collect();
        assert!(base.len() >= 4, "{base:?}");
        let mut check = CheckObserver {
            inner: observer,
            base,
            base_gradient: self.base_gradient,
            batches: &self.batches,
        };
        self.session
            .observe_gradients(model, batches, batch_size, objective, &mut check)
    }
}

/// Zeroes head 2 of layer 0 (its query, key and value rows and its output columns) and neuron 10
/// of layer 1 (its up row and down column).
fn kill_head_and_neuron(model: &WorkingModel) -> Result<()> {
    let zero = |name: &str, axis: usize, from: usize, len: usize| -> Result<()> {
        let t = model.store.get(name).expect(name).tensor().detach();
        let mut mask = vec![1f32; t.dim(axis)?];
        mask[from..from + len].iter_mut().for_each(|m| *m = 0.0);
        let shape: Vec<usize> = (0..2)
            .map(|d| if d == axis { mask.len() } else { 1 })
            .collect();
        let mask = Tensor::from_vec(mask, shape, &Device::Cpu)?;
        let zeroed = t.broadcast_mul(&mask)?;
        model
            .store
            .insert(name, Param::Trainable(Var::from_tensor(&zeroed)?));
        Ok(())
    };
    for part in ["query", "key", "value"] {
        zero(
            &format!("encoder.layer.0.attention.self.{part}.weight"),
            0,
            16,
            8,
        )?;
    }
    zero("encoder.layer.0.attention.output.dense.weight", 1, 16, 8)?;
    zero("encoder.layer.1.intermediate.dense.weight", 0, 10, 1)?;
    zero("encoder.layer.1.output.dense.weight", 1, 10, 1)?;
    Ok(())
}

fn run_stage(model: &mut WorkingModel, trainer: &dyn Trainer, stage: Value) -> Result<Value> {
    let spec: StageSpec = serde_json::from_value(stage)?;
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        work_dir: None,
        index: 1,
        seed: 9,
        progress: &|_| {},
        cancel: &cancel,
    };
    Ok(build(&spec)?.run(model, trainer, &ctx)?)
}

/// What layer `layer` kept of `structure` (original indices).
fn kept(details: &Value, structure: &str, layer: u64) -> Vec<u64> {
    let entry = details["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["structure"] == structure && l["layer"] == layer)
        .unwrap_or_else(|| panic!("no {structure} entry for layer {layer}: {details}"));
    serde_json::from_value(entry["kept"].clone()).unwrap()
}

#[test]
fn lora_importance_cuts_a_dead_head_and_neuron_first_without_a_base_gradient() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (spec, inputs) = tiny(dir.path(), json!([{"type": "finetune"}]))?;
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let mut taylor_model = session.load_input()?;
    let mut model = session.load_input()?;
    let stage = |importance: &str| {
        json!({"type": "prune", "pattern": "structured", "importance": importance,
               "scope": "per_layer", "sparsity": 0.25, "calibration_batches": 3})
    };

    // Taylor differentiates the base: the check's lookups of base weights do find gradients.
    let taylor = GradientCheck {
        session: &session,
        base_gradient: true,
        batches: Cell::new(0),
    };
    run_stage(&mut taylor_model, &taylor, stage("taylor"))?;
    assert_eq!(taylor.batches.get(), 3);

    // LoRAPrune: adapters only, and the dead structures go first.
    kill_head_and_neuron(&model)?;
    let lora = GradientCheck {
        session: &session,
        base_gradient: false,
        batches: Cell::new(0),
    };
    let mut lora_stage = stage("lora");
    lora_stage["lora"] = json!({"rank": 4, "alpha": 8});
    let details = run_stage(&mut model, &lora, lora_stage)?;
    assert_eq!(lora.batches.get(), 3);
    assert_eq!(details["importance"], "lora");
    assert_eq!(details["lora"]["rank"], 4);
    assert_eq!(
        details["lora"]["target_modules"].as_array().unwrap().len(),
        12
    );
    let heads = kept(&details, "heads", 0);
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(!heads.contains(&2), "the dead head was kept: {heads:?}");
    let neurons = kept(&details, "neurons", 1);
    assert_eq!(neurons.len(), 48, "{neurons:?}");
    assert!(!neurons.contains(&10), "the dead neuron was kept");

    // The model is merged (no adapter left, every weight trainable) and physically smaller.
    assert!(model.store.names().iter().all(|n| !n.contains(".lora_")));
    assert_eq!(
        model.store.trainable_vars().len(),
        model.store.names().len()
    );
    let dims = |name: &str| model.store.get(name).unwrap().tensor().dims().to_vec();
    assert_eq!(
        dims("encoder.layer.0.attention.self.query.weight"),
        [24, 32]
    );
    assert_eq!(
        dims("encoder.layer.0.attention.output.dense.weight"),
        [32, 24]
    );
    assert_eq!(dims("encoder.layer.1.intermediate.dense.weight"), [48, 32]);
    assert_eq!(dims("encoder.layer.1.output.dense.weight"), [32, 48]);
    Ok(())
}

#[test]
fn a_lora_tuned_model_pruned_with_lora_recovery_shrinks_and_reloads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (spec, inputs) = tiny(
        dir.path(),
        json!([
            {"type": "finetune", "method": "lora", "rank": 4, "epochs": 3, "learning_rate": 0.01,
             "batch_size": 16},
            {"type": "prune", "pattern": "structured", "importance": "lora", "scope": "global",
             "sparsity": 0.25, "steps": 2, "min_keep": 1, "calibration_batches": 2,
             "lora": {"rank": 4, "alpha": 8},
             "recover": {"epochs": 1, "learning_rate": 0.005}}
        ]),
    )?;
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &dir.path().join("out"),
        &|_| {},
        &AtomicBool::new(false),
    )?;
    let details = &result.report.stages[1].details;
    assert_eq!(details["importance"], "lora");
    assert_eq!(details["recovered"], true);
    assert_eq!(details["lora"]["alpha"], 8);
    for (target, before) in details["targets"].as_array().unwrap().iter().zip([8, 128]) {
        assert_eq!(target["before"], before, "{target}");
        assert_eq!(target["achieved_share"], 0.25, "{target}");
    }
    let params = |i: usize| result.report.stages[i].metrics.parameters;
    assert!(params(1) < params(0), "{} < {}", params(1), params(0));
    // The saved model is plain dense weights, and scores what the job reported.
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let reloaded = session.load_saved(&result.final_dir)?;
    assert!(reloaded.store.names().iter().all(|n| !n.contains("lora")));
    let again = session.evaluate(&reloaded, &result.final_dir)?;
    assert_eq!(again.accuracy, result.report.stages[1].metrics.accuracy);
    Ok(())
}

#[test]
fn lora_settings_are_checked_at_submission() {
    let violations = |stage: Value, train_rows: Option<u64>| {
        let spec: JobSpec = serde_json::from_value(json!({
            "name": "x", "model": "m", "task": {"type": "text_classification", "dataset": "d"},
            "pipeline": [stage]
        }))
        .unwrap();
        let input = ModelState {
            train_rows,
            ..ModelState::input(TaskType::TextClassification)
        };
        spec.validate_from(&input)
            .into_iter()
            .map(|v| v.pointer)
            .collect::<Vec<_>>()
    };
    let lora = |extra: Value| {
        let mut stage = json!({"type": "prune", "pattern": "structured", "sparsity": 0.3});
        stage
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        stage
    };
    assert!(violations(
        lora(json!({"importance": "lora", "lora": {"rank": 8}})),
        None
    )
    .is_empty());
    assert_eq!(
        violations(
            lora(json!({"importance": "taylor", "lora": {"rank": 8}})),
            None
        ),
        ["/pipeline/0/lora"]
    );
    assert_eq!(
        violations(lora(json!({"lora": {}})), None),
        ["/pipeline/0/lora"],
        "lora settings with the default importance (l1)"
    );
    assert_eq!(
        violations(
            lora(json!({"importance": "lora", "lora": {"rank": 0}})),
            None
        ),
        ["/pipeline/0/lora/rank"]
    );
    assert_eq!(
        violations(
            lora(json!({"importance": "lora", "lora": {"target_modules": []}})),
            None
        ),
        ["/pipeline/0/lora/target_modules"]
    );
    // A dataset with no training rows: lora (and taylor, activation) cannot score; l1 can.
    for importance in ["lora", "taylor", "activation"] {
        assert_eq!(
            violations(lora(json!({"importance": importance})), Some(0)),
            ["/pipeline/0/importance"],
            "{importance}"
        );
    }
    assert!(violations(lora(json!({"importance": "l1"})), Some(0)).is_empty());
    assert!(violations(lora(json!({"importance": "lora"})), Some(10)).is_empty());
    let negative: Result<JobSpec, _> = serde_json::from_value(json!({
        "name": "x", "model": "m", "task": {"type": "text_classification", "dataset": "d"},
        "pipeline": [lora(json!({"importance": "lora", "lora": {"rank": -1}}))]
    }));
    assert!(negative.is_err(), "a negative rank does not parse");
}
