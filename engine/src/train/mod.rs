//! Training: the optimizer, learning-rate schedules, gradient clipping and accumulation,
//! checkpoints, and the one trainer loop shared by fine-tuning, pruning recovery, QAT and
//! distillation.

mod adamw_kernel;
pub mod clip;
pub mod grads;
pub mod optimizer;
pub mod schedule;

pub use clip::{ClipConfig, ClipOutcome, GradTransform};
pub use grads::{GradAccumulator, Gradients};
pub use optimizer::{AdamW, AdamWConfig, ParamGroupConfig};
pub use schedule::{Decay, Schedule, ScheduleConfig};
