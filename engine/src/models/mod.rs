//! The architectures, each built from [`crate::ops`] and [`crate::layers`] so every op is
//! differentiable and every projection pluggable, and the [`TaskModel`] face they show the rest of
//! the engine. Which architecture a checkpoint gets is the family registry's call
//! ([`crate::family`]).

pub mod bert;
pub mod common;
pub mod llama;
mod task_model;

pub use task_model::{LayeredModel, Outputs, TaskModel, TaskOutput};
