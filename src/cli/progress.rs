//! What `compressd run` shows while the pipeline runs.
//!
//! On a terminal: one progress bar per training run (step, loss, samples/s, ETA) and a line per
//! stage and measurement. Anywhere else (a script, a CI log): one JSON object per engine event on
//! stderr, which a program can follow line by line.

use std::io::IsTerminal;
use std::sync::Mutex;

use compressd_engine::pipeline::Event;
use indicatif::{ProgressBar, ProgressStyle};

/// Renders engine events; shared with the engine's thread.
pub enum ProgressView {
    /// Bars and lines for a person at a terminal.
    Bars(Mutex<Option<ProgressBar>>),
    /// JSON lines for a program.
    JsonLines,
}

impl ProgressView {
    /// Bars when stderr is a terminal, JSON lines otherwise.
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Self::Bars(Mutex::new(None))
        } else {
            Self::JsonLines
        }
    }

    /// Shows one event.
    pub fn show(&self, event: Event) {
        match self {
            Self::JsonLines => match serde_json::to_string(&event) {
                Ok(line) => eprintln!("{line}"),
                Err(e) => tracing::warn!(error = %e, "progress event not serializable"),
            },
            Self::Bars(bar) => {
                // A poisoned lock only means an earlier event panicked mid-draw; keep drawing.
                let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
                show_on_terminal(&mut bar, event);
            }
        }
    }
}

fn show_on_terminal(bar: &mut Option<ProgressBar>, event: Event) {
    match event {
        Event::StageStarted { index, stage } => {
            finish(bar);
            match index {
                Some(i) => eprintln!("▶ stage {i}: {stage}"),
                None => eprintln!("▶ {stage}: measuring the input model"),
            }
        }
        Event::Progress {
            step,
            total_steps,
            loss,
            samples_per_s,
            ..
        } => {
            let bar = bar.get_or_insert_with(|| training_bar(total_steps));
            if bar.length() != Some(total_steps) {
                bar.set_length(total_steps);
            }
            bar.set_position(step);
            let mut message = String::new();
            if let Some(loss) = loss {
                message.push_str(&format!("loss {loss:.4}"));
            }
            if let Some(rate) = samples_per_s {
                message.push_str(&format!("  {rate:.1} samples/s"));
            }
            bar.set_message(message);
        }
        Event::Metric { label, metrics } => {
            finish(bar);
            let mut parts = Vec::new();
            if let Some(a) = metrics.accuracy {
                parts.push(format!("accuracy {a:.4}"));
            }
            if let Some(f) = metrics.macro_f1 {
                parts.push(format!("macro-F1 {f:.4}"));
            }
            if let Some(p) = metrics.perplexity {
                parts.push(format!("perplexity {p:.3}"));
            }
            parts.push(format!(
                "{:.1} MB on disk",
                metrics.size_on_disk_bytes as f64 / 1e6
            ));
            if let Some(ms) = metrics.latency_batch1_ms {
                parts.push(format!("batch-1 {ms:.1} ms"));
            }
            eprintln!("  {label}: {}", parts.join(", "));
        }
        Event::Warning { message, .. } => {
            finish(bar);
            eprintln!("  warning: {message}");
        }
        Event::StageFinished {
            index,
            stage,
            wall_s,
            acceptance_met,
        } => {
            finish(bar);
            let verdict = match acceptance_met {
                Some(true) => ", contract kept",
                Some(false) => ", contract MISSED",
                None => "",
            };
            eprintln!("✔ stage {index}: {stage} in {wall_s:.1} s{verdict}");
        }
    }
}

fn training_bar(total_steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(total_steps);
    let style =
        ProgressStyle::with_template("  [{bar:30.cyan/blue}] {pos}/{len} steps  {msg}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar
}

fn finish(bar: &mut Option<ProgressBar>) {
    if let Some(bar) = bar.take() {
        bar.finish_and_clear();
    }
}
