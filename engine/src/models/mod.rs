//! Model families, each built from [`crate::ops`] and [`crate::layers`] so every op is
//! differentiable and every projection pluggable.

pub mod bert;
pub mod common;
pub mod llama;
