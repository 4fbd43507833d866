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
pub mod train;
pub mod quant;
pub mod prune;
pub mod report;
pub mod pipeline;
pub mod stages;
pub mod data;
pub mod eval;
pub mod task;
pub mod perf;
