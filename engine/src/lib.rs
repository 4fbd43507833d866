//! The compressd compression engine.
//!
//! It takes a model, data and a stage spec, and reports progress through a callback. It knows nothing
//! of HTTP, SQL or object storage: the service crate is a thin shell around it, and it is usable
//! (and tested) alone.

pub mod device;
pub mod error;
pub mod export;
pub mod layers;
pub mod loading;
pub mod models;
pub mod ops;
pub mod params;
pub mod spec;

pub use error::{EngineError, Result};
pub mod data;
pub mod eval;
pub mod perf;
pub mod pipeline;
pub mod prune;
pub mod quant;
pub mod report;
pub mod stages;
pub mod task;
pub mod train;

pub mod family;
pub mod objective;
#[cfg(test)]
mod test_values;
