//! Training: the optimizer, learning-rate schedules, gradient clipping and accumulation,
//! checkpoints, and the one trainer loop shared by fine-tuning, pruning recovery, QAT and
//! distillation.

mod adamw_kernel;
pub mod best;
pub mod checkpoint;
pub mod clip;
pub mod grads;
pub mod hooks;
pub mod loss_scale;
pub mod optimizer;
pub mod recompute;
pub mod schedule;
pub mod trainer;

pub use clip::{ClipConfig, ClipOutcome, GradTransform};
pub use grads::{GradAccumulator, Gradients};
pub use hooks::{
    EarlyStopping, GradientObserver, IgnoreGradients, NoHooks, Progress, TrainHooks, TrainTask,
};
pub use loss_scale::{LossScaler, LossScaling};
pub use optimizer::{AdamW, AdamWConfig, ParamGroupConfig};
pub use schedule::{Decay, Schedule, ScheduleConfig};
pub use trainer::{LossScaleReport, StopReason, TrainConfig, TrainReport, Trainer};
