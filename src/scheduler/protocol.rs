//! The child-process protocol between a worker and `compressd exec`.
//!
//! The worker writes one [`ExecRequest`] as JSON on the child's stdin and closes it. The child
//! answers with [`ChildMessage`]s, one JSON object per line on stdout, as work happens, and ends
//! with exactly one terminal message ([`ChildMessage::Succeeded`] or [`ChildMessage::Failed`]).
//! Stdout carries nothing else; logs and panics go to stderr, of which the worker keeps the last
//! lines so that a crash can be explained. A line on stdout that is not a protocol message is kept
//! as a log line rather than failing the job: a stray `println!` in a dependency must not turn a
//! good run into a failed one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the worker hands the child: the job and where its inputs are on this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The job being run.
    pub job_id: Uuid,
    /// Which attempt this is (1 for the first run); checkpoints are resumed when it is above 1.
    pub attempt: i32,
    /// The job spec as stored (defaults filled in).
    pub spec: serde_json::Value,
    /// Local paths of the job's inputs, resolved by the worker from their ids.
    #[serde(default)]
    pub inputs: ExecInputs,
    /// A folder owned by this job on this machine; checkpoints and outputs are written under it.
    pub work_dir: PathBuf,
}

/// Local paths of a job's inputs. `None` when the worker could not resolve them (the child then
/// fails the job as bad input, without retry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecInputs {
    /// The model's folder or file.
    pub model: Option<PathBuf>,
    /// The dataset's file.
    pub dataset: Option<PathBuf>,
    /// The registered models the spec's stages name (a `distill` stage's `teacher` or
    /// `student`), by id; an id the worker could not resolve is missing (the stage then fails
    /// the job as bad input).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, PathBuf>,
}

/// A file the child produced, to be published by the worker as one of the job's artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputFile {
    /// The artifact's name, unique within the job; `/` groups files of a folder (`model/…`).
    pub name: String,
    /// Where the file is, relative to the request's `work_dir`.
    pub path: PathBuf,
    /// `model`, `report`, `checkpoint` or `log`.
    pub kind: String,
    /// `safetensors`, `gguf`, `json`, `markdown`, `text`…
    pub format: String,
}

/// One message from the child to its worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChildMessage {
    /// A pipeline stage began.
    StageStarted {
        /// The stage's type, e.g. `prune`.
        stage: String,
        /// Its position in the pipeline, from 0.
        index: usize,
        /// How many stages the pipeline has.
        stages: usize,
    },
    /// How far the current stage is. The worker throttles these before they reach the database.
    Progress {
        /// Fraction of the current stage done, in `[0, 1]`.
        fraction: f64,
        /// Estimated seconds left in the whole job, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eta_seconds: Option<f64>,
        /// A short human-readable note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A measured value (loss, learning rate, gradient norm, an evaluation metric).
    Metric {
        /// The metric's name, e.g. `train.loss`.
        name: String,
        /// Its value.
        value: f64,
        /// The optimizer step it belongs to, when it belongs to one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
    },
    /// A line worth showing the user.
    Log {
        /// `info`, `warn` or `error`.
        level: String,
        /// The line.
        message: String,
    },
    /// A pipeline stage ended.
    StageFinished {
        /// The stage's type.
        stage: String,
        /// Its position in the pipeline, from 0.
        index: usize,
        /// The stage's report (metrics, sizes, timings).
        report: serde_json::Value,
    },
    /// The job succeeded; `result` becomes the job's result once the worker has published
    /// `outputs` as the job's artifacts.
    Succeeded {
        /// The job's result object.
        result: serde_json::Value,
        /// Files of the work folder to publish as artifacts (none for a dry run).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        outputs: Vec<OutputFile>,
    },
    /// The job failed. `retryable` is false when the job itself is at fault (bad input, a
    /// stage that does not exist): running it again would fail the same way.
    Failed {
        /// A stable slug, e.g. `invalid_spec`, `stage_not_implemented`.
        code: String,
        /// What went wrong, for a person.
        message: String,
        /// Whether another attempt could succeed.
        retryable: bool,
        /// Files of the stages that finished before the failure (their saved models). The worker
        /// publishes them when this failure ends the job, so a pipeline that fails in a late stage
        /// (a full disk, a bad setting) still hands over what its earlier stages made.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kept: Vec<OutputFile>,
    },
}

impl ChildMessage {
    /// Whether this message ends the child's run.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded { .. } | Self::Failed { .. })
    }

    /// Parses one stdout line. A line that is not a protocol message becomes an `info` log line
    /// (see the module comment for why this is not an error).
    pub fn parse_line(line: &str) -> Self {
        serde_json::from_str(line).unwrap_or_else(|_| Self::Log {
            level: "info".to_owned(),
            message: line.to_owned(),
        })
    }

    /// Writes this message as one line to `out` and flushes, so the worker sees it at once.
    ///
    /// # Errors
    /// When `out` cannot be written (the worker went away).
    pub fn write_line(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        line.push(b'\n');
        out.write_all(&line)?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_single_json_lines() {
        let messages = [
            ChildMessage::StageStarted {
                stage: "prune".into(),
                index: 1,
                stages: 3,
            },
            ChildMessage::Progress {
                fraction: 0.25,
                eta_seconds: Some(12.0),
                message: None,
            },
            ChildMessage::Metric {
                name: "train.loss".into(),
                value: 0.5,
                step: Some(10),
            },
            ChildMessage::Failed {
                code: "invalid_spec".into(),
                message: "bad".into(),
                retryable: false,
                kept: Vec::new(),
            },
        ];
        for message in messages {
            let mut out = Vec::new();
            message.write_line(&mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.matches('\n').count(), 1, "exactly one line: {text}");
            assert_eq!(ChildMessage::parse_line(text.trim_end()), message);
        }
    }

    #[test]
    fn a_line_that_is_not_a_message_becomes_a_log_line() {
        let parsed = ChildMessage::parse_line("hello from a dependency");
        assert_eq!(
            parsed,
            ChildMessage::Log {
                level: "info".into(),
                message: "hello from a dependency".into()
            }
        );
        let unknown_type = ChildMessage::parse_line(r#"{"type":"teleport"}"#);
        assert!(matches!(unknown_type, ChildMessage::Log { .. }));
    }

    #[test]
    fn only_succeeded_and_failed_are_terminal() {
        assert!(ChildMessage::Succeeded {
            result: serde_json::json!({}),
            outputs: Vec::new(),
        }
        .is_terminal());
        assert!(!ChildMessage::Log {
            level: "info".into(),
            message: String::new()
        }
        .is_terminal());
    }
}
