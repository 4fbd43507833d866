//! The `distill` stage's spec: its fields and defaults, checks, preconditions and estimate.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::DistillStage;
use crate::error::{EngineError, Result};
use crate::objective::{FeatureLoss, Pooling, RelationLoss, Tokens};
use crate::spec::{
    Checker, Estimate, ModelState, Precondition, StageKind, TaskType, Workload, MAX_BATCH_SIZE,
    MAX_EPOCHS,
};
use crate::stages::finetune::{default_batch_size, default_finetune_epochs, default_learning_rate};
use crate::stages::Stage;

/// Settings of a distillation stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// The teacher: `null` is the pipeline's model as it enters the stage; otherwise a registered
    /// model id (API) or a local folder or file (`compressd run`) of the job's tokenizer and, for
    /// classification, the task's labels (its `id2label`, in the data's order).
    #[serde(default)]
    #[schemars(length(min = 1, max = 4096))]
    pub teacher: Option<String>,
    /// The student: `null` builds it from the teacher (`student_layers`, `layer_init`);
    /// otherwise a registered model id (API) or a local folder or file (`compressd run`) of the
    /// job's tokenizer with fewer parameters than the teacher, trained as it is (a missing or
    /// mismatched task head is made anew). `student_layers` must then be `null`.
    #[serde(default)]
    #[schemars(length(min = 1, max = 4096))]
    pub student: Option<String>,
    /// Transformer layers of the student; `null` means half the teacher's, rounded up.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub student_layers: Option<u32>,
    /// Attention heads of every student layer, when fewer than the teacher's: the heads of least
    /// weight magnitude are cut (whole key/value groups for grouped-query attention, so a
    /// multiple of the teacher's query heads per key/value head). For a student built from the
    /// teacher; `null` keeps the teacher's.
    #[serde(default)]
    #[schemars(range(min = 1, max = 4096))]
    pub attention_heads: Option<u32>,
    /// FFN neurons of every student layer, when fewer than the teacher's: the neurons of least
    /// weight magnitude are cut. For a student built from the teacher; `null` keeps the
    /// teacher's.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub intermediate_size: Option<u32>,
    /// Hidden size (width of the residual stream) of the student, when smaller than the
    /// teacher's: the channels of least weight magnitude are cut from every tensor that carries
    /// them. The head size stays the teacher's, so it must be a multiple of it and the student
    /// has `hidden_size / head_dim` heads (`attention_heads`, if given, must agree). Feature
    /// knowledge then goes through a learned projection. For a student built from the teacher;
    /// `null` keeps the teacher's.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub hidden_size: Option<u32>,
    /// How the heads and neurons a narrower student keeps are ranked (structured pruning's
    /// importance): `l1` / `l2` weight magnitude, or `taylor` / `activation` / `mask` on 8 calibration
    /// batches of the training data, scored on the student built from the teacher's layers
    /// (`lora` is structured pruning's only). The hidden channels are always ranked by magnitude.
    #[serde(default)]
    pub narrow_importance: crate::stages::prune_structured::Importance,
    /// Which teacher layers initialise the student's: `every_other` (evenly spaced, ending with
    /// the last), `first`, `last`, or a list of layer indices (0-based, in order).
    #[serde(default)]
    pub layer_init: LayerInit,
    /// Passes over the training split.
    #[serde(default = "default_finetune_epochs")]
    #[schemars(range(min = 1, max = MAX_EPOCHS))]
    pub epochs: u32,
    /// Peak learning rate of the student.
    #[serde(default = "default_learning_rate")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub learning_rate: f64,
    /// Softmax temperature of the response knowledge, applied to teacher and student logits.
    #[serde(default = "default_temperature")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 100))]
    pub temperature: f64,
    /// Response knowledge over only the teacher's `top_k` likeliest classes (tokens) of each
    /// distribution, renormalised, to bound a language model's memory; `null` uses all.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub top_k: Option<u32>,
    /// How much each kind of knowledge counts in the student's loss.
    #[serde(default)]
    pub weights: LossWeights,
    /// The teacher layer each student layer's output is matched to by the feature knowledge,
    /// one entry per student layer (0-based); `null` means uniform: student layer `i` of `s`
    /// matches teacher layer `(i + 1) · t / s − 1` of `t`.
    #[serde(default)]
    pub layer_map: Option<Vec<u32>>,
    /// Feature knowledge: how hidden states are matched.
    #[serde(default)]
    pub feature: FeatureSpec,
    /// Relation knowledge: how the batch's sample-to-sample similarities are matched.
    #[serde(default)]
    pub relation: RelationSpec,
    /// Examples per optimizer step.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = MAX_BATCH_SIZE))]
    pub batch_size: u32,
    /// Report each loss term (`train.loss.task`, `train.loss.response`…) every this many steps.
    #[serde(default = "default_log_every_steps")]
    #[schemars(range(min = 1, max = 100_000))]
    pub log_every_steps: u32,
    /// The student's vocabulary: `full` keeps the teacher's; `task` keeps only the tokens the
    /// task's data uses (every split, as tokenized for the job) plus the special tokens, cutting the
    /// embedding table and renumbering the tokenizer shipped with the model. For WordPiece and
    /// WordLevel tokenizers (BERT-style models); text outside the data's vocabulary then falls
    /// back to shorter pieces or `[UNK]`.
    #[serde(default)]
    pub vocabulary: VocabularyChoice,
    /// Keep the teacher's outputs per training example after the first epoch computes them, so
    /// later epochs do not run the teacher (outputs cut to each example's real tokens; examples
    /// beyond `cache_teacher_max_mib` are recomputed). The stage report's
    /// `training.teacher_cache` says what was held and used.
    #[serde(default)]
    pub cache_teacher: bool,
    /// The teacher cache's budget in MiB.
    #[serde(default = "default_cache_teacher_max_mib")]
    #[schemars(range(min = 1, max = 1_048_576))]
    pub cache_teacher_max_mib: u32,
    /// Activation recomputation for the student, as a `finetune` stage's
    /// `gradient_checkpointing`: only each student block's input is kept through the forward
    /// pass, and the block runs again in backward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Mixed-precision training of the student, as a `finetune` stage's `mixed_precision` (CUDA,
    /// or bf16 on a CPU with AVX-512 BF16; the teacher runs in f32).
    #[serde(default)]
    pub mixed_precision: Option<crate::stages::finetune::MixedPrecision>,
}

fn default_cache_teacher_max_mib() -> u32 {
    1024
}

/// Which tokens a student keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VocabularyChoice {
    /// The teacher's whole vocabulary.
    #[default]
    Full,
    /// The tokens of the task's data and the special tokens.
    Task,
}

/// The weights of the loss terms; the student minimises `Σ weight · term`. A term of weight 0 is
/// not computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LossWeights {
    /// The task's own loss on the labels (or next tokens).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub task: f64,
    /// Response knowledge: `T² · KL(teacher ‖ student)` of the temperature-softened outputs.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub response: f64,
    /// Feature knowledge: hidden states matched on `layer_map` (see `feature`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub feature: f64,
    /// Relation knowledge: the batch's similarity structure matched (see `relation`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub relation: f64,
}

impl Default for LossWeights {
    /// Half task loss, half response knowledge (Hinton et al.'s mix).
    fn default() -> Self {
        Self {
            task: 0.5,
            response: 0.5,
            feature: 0.0,
            relation: 0.0,
        }
    }
}

impl LossWeights {
    fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("task", self.task),
            ("response", self.response),
            ("feature", self.feature),
            ("relation", self.relation),
        ]
    }
}

/// How feature knowledge matches hidden states.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// `mse` (mean squared error) or `cosine` (1 − cosine similarity).
    #[serde(default)]
    pub loss: FeatureLoss,
    /// `all` (every real token), `cls` (the first token) or `mean` (the mask-weighted mean).
    #[serde(default)]
    pub tokens: Tokens,
    /// Whether a learned linear projection maps the student's hidden states to the teacher's
    /// width when the widths differ (trained with the student, not exported); without it such
    /// models are refused.
    #[serde(default = "default_true")]
    pub projection: bool,
    /// Also match each mapped layer's attention probabilities (TinyBERT), under the feature
    /// weight; the student's and teacher's head counts must agree.
    #[serde(default)]
    pub attention: bool,
}

impl Default for FeatureSpec {
    fn default() -> Self {
        Self {
            loss: FeatureLoss::default(),
            tokens: Tokens::default(),
            projection: true,
            attention: false,
        }
    }
}

/// How relation knowledge compares the batch's samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelationSpec {
    /// `mse` between the cosine-similarity matrices of teacher and student, `kl` between their
    /// rows softened at `temperature`, or `infonce`: each student vector must pick its own
    /// teacher vector out of the batch.
    #[serde(default)]
    pub loss: RelationLoss,
    /// The vector per sample, from the last hidden states: `mean` (mask-weighted) or `cls`.
    #[serde(default)]
    pub pooling: Pooling,
    /// Temperature of `kl` and `infonce`.
    #[serde(default = "default_relation_temperature")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 100))]
    pub temperature: f64,
}

impl Default for RelationSpec {
    fn default() -> Self {
        Self {
            loss: RelationLoss::default(),
            pooling: Pooling::default(),
            temperature: default_relation_temperature(),
        }
    }
}

/// Which teacher layers a student starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum LayerInit {
    /// A rule over the teacher's layers.
    Rule(LayerRule),
    /// The teacher's layers to keep, in order.
    Layers(Vec<u32>),
}

/// The rules of [`LayerInit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LayerRule {
    /// Evenly spaced, ending with the teacher's last layer (DistilBERT's choice).
    EveryOther,
    /// The teacher's first layers.
    First,
    /// The teacher's last layers.
    Last,
}

impl Default for LayerInit {
    fn default() -> Self {
        LayerInit::Rule(LayerRule::EveryOther)
    }
}

fn default_temperature() -> f64 {
    2.0
}
fn default_relation_temperature() -> f64 {
    0.1
}
fn default_log_every_steps() -> u32 {
    10
}
fn default_true() -> bool {
    true
}

/// Evenly spaced layers of `of`, ending with the last: `(i + 1) · of / count − 1`.
fn uniform(count: usize, of: usize) -> Vec<usize> {
    (1..=count).map(|i| i * of / count - 1).collect()
}

impl DistillSpec {
    /// The student's layer count, when the spec fixes it without knowing the teacher.
    fn fixed_student_layers(&self) -> Option<usize> {
        match &self.layer_init {
            LayerInit::Layers(list) => Some(list.len()),
            LayerInit::Rule(_) => self.student_layers.map(|n| n as usize),
        }
    }

    /// The teacher layers the student keeps, for a teacher of `teacher_layers`.
    ///
    /// # Errors
    /// A student that is not smaller than the teacher, a list of the wrong length, or a layer the
    /// teacher does not have.
    pub fn student_layer_indices(&self, teacher_layers: usize) -> Result<Vec<usize>> {
        let wanted = self
            .fixed_student_layers()
            .unwrap_or(teacher_layers.div_ceil(2));
        if wanted == 0 || wanted >= teacher_layers {
            return Err(EngineError::InvalidSetting(format!(
                "distill: a student of {wanted} layers is not smaller than its {teacher_layers}-layer teacher"
            )));
        }
        let keep: Vec<usize> = match &self.layer_init {
            LayerInit::Layers(list) => {
                if self
                    .student_layers
                    .is_some_and(|n| n as usize != list.len())
                {
                    return Err(EngineError::InvalidSetting(format!(
                        "distill: layer_init lists {} layers but student_layers is {}",
                        list.len(),
                        self.student_layers.unwrap_or_default()
                    )));
                }
                list.iter().map(|&l| l as usize).collect()
            }
            LayerInit::Rule(LayerRule::First) => (0..wanted).collect(),
            LayerInit::Rule(LayerRule::Last) => (teacher_layers - wanted..teacher_layers).collect(),
            LayerInit::Rule(LayerRule::EveryOther) => uniform(wanted, teacher_layers),
        };
        if let Some(bad) = keep.iter().find(|&&l| l >= teacher_layers) {
            return Err(EngineError::InvalidSetting(format!(
                "distill: layer_init names layer {bad}; the teacher has layers 0 to {}",
                teacher_layers - 1
            )));
        }
        Ok(keep)
    }

    /// `(student layer, teacher layer)` pairs the feature knowledge matches.
    ///
    /// # Errors
    /// A `layer_map` whose length is not the student's layer count or that names a teacher layer
    /// that does not exist.
    pub fn feature_layer_pairs(
        &self,
        student_layers: usize,
        teacher_layers: usize,
    ) -> Result<Vec<(usize, usize)>> {
        let teacher: Vec<usize> = match &self.layer_map {
            None => uniform(student_layers, teacher_layers),
            Some(map) => map.iter().map(|&l| l as usize).collect(),
        };
        if teacher.len() != student_layers {
            return Err(EngineError::InvalidSetting(format!(
                "distill: layer_map has {} entries for a student of {student_layers} layers",
                teacher.len()
            )));
        }
        if let Some(bad) = teacher.iter().find(|&&l| l >= teacher_layers) {
            return Err(EngineError::InvalidSetting(format!(
                "distill: layer_map names teacher layer {bad}; the teacher has layers 0 to {}",
                teacher_layers.saturating_sub(1)
            )));
        }
        Ok(teacher.into_iter().enumerate().collect())
    }

    /// The teacher's layer count as the pipeline knows it at submission, checked against every
    /// layer the spec names: `(field, problem)` of the first that does not fit.
    ///
    /// With a registered `student` only the `layer_map` is checked, against `student_layers` of the
    /// student when known.
    pub fn check_against_teacher(
        &self,
        teacher_layers: usize,
        student_layers: Option<usize>,
    ) -> Option<(&'static str, String)> {
        if self.student.is_some() {
            let pairs = match (student_layers, &self.layer_map) {
                (Some(student), Some(_)) => self.feature_layer_pairs(student, teacher_layers),
                _ => Ok(Vec::new()),
            };
            return pairs.err().map(|e| ("layer_map", e.to_string()));
        }
        if let Err(e) = self.student_layer_indices(teacher_layers) {
            let field = match self.layer_init {
                LayerInit::Layers(_) => "layer_init",
                LayerInit::Rule(_) => "student_layers",
            };
            return Some((field, e.to_string()));
        }
        let student = self
            .fixed_student_layers()
            .unwrap_or(teacher_layers.div_ceil(2));
        if self.layer_map.is_some() {
            if let Err(e) = self.feature_layer_pairs(student, teacher_layers) {
                return Some(("layer_map", e.to_string()));
            }
        }
        None
    }
}

impl StageKind for DistillSpec {
    const TYPE: &'static str = "distill";
    const IMPLEMENTED: bool = true;

    fn check_device(&self, device: &candle_core::Device) -> Result<()> {
        crate::stages::finetune::MixedPrecision::check_device(self.mixed_precision, device)
    }

    fn check(&self, c: &mut Checker, at: &str) {
        for (field, reference) in [("teacher", &self.teacher), ("student", &self.student)] {
            if let Some(reference) = reference {
                c.check(
                    !reference.trim().is_empty(),
                    &format!("{at}/{field}"),
                    || "must name a registered model (or be null)".to_owned(),
                );
            }
        }
        if self.student.is_some() {
            c.check(
                self.student_layers.is_none() && !matches!(self.layer_init, LayerInit::Layers(_)),
                &format!(
                    "{at}/{}",
                    if self.student_layers.is_some() {
                        "student_layers"
                    } else {
                        "layer_init"
                    }
                ),
                || {
                    "builds a student from the teacher's layers: leave it out with `student`"
                        .to_owned()
                },
            );
        }
        for (field, width) in [
            ("attention_heads", self.attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("hidden_size", self.hidden_size),
        ] {
            let Some(width) = width else { continue };
            c.range_u32(width, 1, 1_000_000, &format!("{at}/{field}"));
            c.check(self.student.is_none(), &format!("{at}/{field}"), || {
                "narrows a student built from the teacher: leave it out with `student`".to_owned()
            });
        }
        c.check(
            !((self.attention_heads.is_some() || self.hidden_size.is_some())
                && self.feature.attention
                && self.weights.feature > 0.0),
            &format!(
                "{at}/{}",
                if self.attention_heads.is_some() {
                    "attention_heads"
                } else {
                    "hidden_size"
                }
            ),
            || {
                "attention matching (feature.attention) compares head by head: keep the \
                 teacher's heads or turn it off"
                    .to_owned()
            },
        );
        c.check(
            !(self.gradient_checkpointing && self.feature.attention && self.weights.feature > 0.0),
            &format!("{at}/gradient_checkpointing"),
            || {
                "attention matching (feature.attention) reads every student layer's attention \
                 probabilities, which recomputation does not keep: turn one of them off"
                    .to_owned()
            },
        );
        if let Some(layers) = self.student_layers {
            c.range_u32(layers, 1, 1000, &format!("{at}/student_layers"));
        }
        c.check(
            self.narrow_importance != crate::stages::prune_structured::Importance::Lora,
            &format!("{at}/narrow_importance"),
            || {
                "lora importance needs LoRA adapters: use l1, l2, taylor, activation or mask"
                    .to_owned()
            },
        );
        c.range_u32(
            self.cache_teacher_max_mib,
            1,
            1_048_576,
            &format!("{at}/cache_teacher_max_mib"),
        );
        if let LayerInit::Layers(list) = &self.layer_init {
            c.check(!list.is_empty(), &format!("{at}/layer_init"), || {
                "must name at least one layer".to_owned()
            });
            let mut sorted = list.clone();
            sorted.sort_unstable();
            sorted.dedup();
            c.check(
                sorted.len() == list.len(),
                &format!("{at}/layer_init"),
                || "must not name a layer twice".to_owned(),
            );
            if let Some(n) = self.student_layers {
                c.check(
                    n as usize == list.len(),
                    &format!("{at}/layer_init"),
                    || format!("lists {} layers but student_layers is {n}", list.len()),
                );
            }
        }
        if let Some(map) = &self.layer_map {
            let pointer = format!("{at}/layer_map");
            c.check(!map.is_empty(), &pointer, || {
                "must name a teacher layer for each student layer".to_owned()
            });
            if let Some(student) = self.fixed_student_layers() {
                c.check(map.len() == student, &pointer, || {
                    format!(
                        "has {} entries for a student of {student} layers (one teacher layer per student layer)",
                        map.len()
                    )
                });
            }
        }
        if let Some(k) = self.top_k {
            c.range_u32(k, 1, 1_000_000, &format!("{at}/top_k"));
        }
        c.range_u32(self.epochs, 1, MAX_EPOCHS, &format!("{at}/epochs"));
        c.learning_rate(self.learning_rate, &format!("{at}/learning_rate"));
        c.check(
            self.temperature > 0.0 && self.temperature <= 100.0,
            &format!("{at}/temperature"),
            || format!("must be in (0, 100], got {}", self.temperature),
        );
        for (name, weight) in self.weights.named() {
            c.check(
                weight.is_finite() && (0.0..=1000.0).contains(&weight),
                &format!("{at}/weights/{name}"),
                || format!("must be between 0 and 1000, got {weight}"),
            );
        }
        c.check(
            self.weights.named().iter().any(|(_, w)| *w > 0.0),
            &format!("{at}/weights"),
            || "must give at least one term a positive weight (they sum to zero)".to_owned(),
        );
        c.check(
            self.relation.temperature > 0.0 && self.relation.temperature <= 100.0,
            &format!("{at}/relation/temperature"),
            || format!("must be in (0, 100], got {}", self.relation.temperature),
        );
        c.range_u32(
            self.batch_size,
            1,
            MAX_BATCH_SIZE,
            &format!("{at}/batch_size"),
        );
        c.range_u32(
            self.log_every_steps,
            1,
            100_000,
            &format!("{at}/log_every_steps"),
        );
    }

    /// A quantized or pruned teacher is fine: the student starts from its (dequantized) weights
    /// in full precision, and only the frozen teacher runs on the quantized kernels.
    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        let byte_level = model.task == TaskType::LanguageModeling
            || model.family.as_deref().is_some_and(|f| f != "bert");
        if self.vocabulary == VocabularyChoice::Task && byte_level {
            return Err(Precondition {
                name: "a WordPiece vocabulary",
                field: Some("vocabulary"),
                message: "vocabulary \"task\" trims WordPiece vocabularies (BERT-style \
                          classifiers); a language model's BPE merges need tokens its data may \
                          not use: leave vocabulary at \"full\""
                    .into(),
            });
        }
        // A registered teacher or student is checked by whoever resolves it (the service at
        // submission, the stage when it loads them): the incoming model is not the teacher then.
        let registered = self.teacher.is_some() || self.student.is_some();
        let layers = model.layers.filter(|_| !registered);
        match layers.and_then(|l| self.check_against_teacher(l, None)) {
            Some((field, message)) => Err(Precondition {
                name: "a teacher deeper than its student",
                field: Some(field),
                message,
            }),
            None => Ok(()),
        }
    }

    /// The student is a new, dense model in full precision.
    fn transform(&self, model: &mut ModelState, _index: usize) {
        model.quantized_at = None;
        model.pruned = false;
        model.layers = match (&self.teacher, &self.student) {
            (_, Some(_)) => None,
            (Some(_), None) => self.fixed_student_layers(),
            (None, None) => model
                .layers
                .map(|l| self.fixed_student_layers().unwrap_or(l.div_ceil(2))),
        };
    }

    /// A distillation step runs the teacher forward too: about 8 flops per parameter per token
    /// instead of 6, and half as much memory again.
    fn estimate(&self, work: &Workload) -> Estimate {
        Estimate {
            // The teacher's forward pass adds 2 flops per parameter per token to the student's 6
            // (or 8, recomputing).
            seconds: if self.gradient_checkpointing {
                work.recomputed_training_seconds(f64::from(self.epochs)) * 10.0 / 8.0
            } else {
                work.training_seconds(f64::from(self.epochs)) * 8.0 / 6.0
            },
            // The teacher cache may fill its budget on top of training.
            peak_bytes: work.training_peak_bytes() * 1.5
                + if self.cache_teacher {
                    f64::from(self.cache_teacher_max_mib) * 1024.0 * 1024.0
                } else {
                    0.0
                },
        }
    }

    fn build(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(DistillStage { spec: self.clone() }))
    }
}
