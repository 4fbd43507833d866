//! Teacher and student side by side, for a stage that replaces the model with a smaller one
//! trained from it (`distill`): what was given up (the metric) for what was won (parameters, size,
//! latency).

use serde::{Deserialize, Serialize};

use super::ModelMetrics;

/// The key of a stage record's `details` that holds a [`Comparison`].
pub const DETAILS_KEY: &str = "teacher_and_student";

/// One model's side of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// Scalar parameters.
    pub parameters: usize,
    /// Bytes of the saved model folder.
    pub size_on_disk_bytes: u64,
    /// Median latency of one example, in milliseconds.
    pub latency_batch1_ms: Option<f64>,
    /// Median latency of a batch of 32, in milliseconds.
    pub latency_batch32_ms: Option<f64>,
    /// The task's metric: accuracy for classification, perplexity for language modelling.
    pub metric: Option<f64>,
}

/// Teacher and student, and the ratios between them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// `accuracy` or `perplexity`.
    pub metric: String,
    /// The model as it entered the stage.
    pub teacher: Side,
    /// The model the stage made.
    pub student: Side,
    /// The share of the teacher's metric the student keeps: student ÷ teacher for accuracy,
    /// teacher ÷ student for perplexity (lower is better), so 1 means nothing lost either way.
    pub metric_kept: Option<f64>,
    /// Teacher parameters ÷ student parameters.
    pub parameter_ratio: f64,
    /// Teacher size on disk ÷ student size on disk.
    pub size_ratio: f64,
    /// Teacher latency ÷ student latency at batch 1.
    pub speedup_batch1: Option<f64>,
    /// Teacher latency ÷ student latency at batch 32.
    pub speedup_batch32: Option<f64>,
}

fn side(m: &ModelMetrics) -> Side {
    Side {
        parameters: m.parameters,
        size_on_disk_bytes: m.size_on_disk_bytes,
        latency_batch1_ms: m.latency_batch1_ms,
        latency_batch32_ms: m.latency_batch32_ms,
        metric: m.accuracy.or(m.perplexity),
    }
}

fn ratio(top: Option<f64>, bottom: Option<f64>) -> Option<f64> {
    match (top, bottom) {
        (Some(t), Some(b)) if b > 0.0 && t.is_finite() && b.is_finite() => Some(t / b),
        _ => None,
    }
}

impl Comparison {
    /// The comparison of `student` with the `teacher` it was trained from.
    pub fn new(teacher: &ModelMetrics, student: &ModelMetrics) -> Self {
        let (t, s) = (side(teacher), side(student));
        let perplexity = teacher.accuracy.is_none() && teacher.perplexity.is_some();
        let metric_kept = if perplexity {
            ratio(t.metric, s.metric)
        } else {
            ratio(s.metric, t.metric)
        };
        Self {
            metric: if perplexity { "perplexity" } else { "accuracy" }.into(),
            metric_kept,
            parameter_ratio: t.parameters as f64 / s.parameters.max(1) as f64,
            size_ratio: t.size_on_disk_bytes as f64 / s.size_on_disk_bytes.max(1) as f64,
            speedup_batch1: ratio(t.latency_batch1_ms, s.latency_batch1_ms),
            speedup_batch32: ratio(t.latency_batch32_ms, s.latency_batch32_ms),
            teacher: t,
            student: s,
        }
    }

    /// The comparison as a Markdown table under a heading naming the stage.
    pub fn to_markdown(&self, label: &str) -> String {
        let opt = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |v| format!("{v:.d$}"));
        let row = |name: &str, s: &Side| {
            format!(
                "| {name} | {} | {:.2} | {} | {} | {} |\n",
                s.parameters,
                s.size_on_disk_bytes as f64 / 1e6,
                opt(s.latency_batch1_ms, 2),
                opt(s.latency_batch32_ms, 1),
                opt(s.metric, 4),
            )
        };
        let mut md = format!("\n## Teacher and student (`{label}`)\n\n");
        md.push_str(&format!(
            "| model | params | size MB | batch-1 ms | batch-32 ms | {} |\n|---|---|---|---|---|---|\n",
            self.metric
        ));
        md.push_str(&row("teacher", &self.teacher));
        md.push_str(&row("student", &self.student));
        md.push_str(&format!(
            "\nThe student keeps {} of the teacher's {}, with {:.2}x fewer parameters, {:.2}x less \
             disk, and is {}x faster at batch 1 and {}x at batch 32.\n",
            self.metric_kept
                .map_or("–".to_string(), |k| format!("{:.1}%", 100.0 * k)),
            self.metric,
            self.parameter_ratio,
            self.size_ratio,
            opt(self.speedup_batch1, 2),
            opt(self.speedup_batch32, 2),
        ));
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_the_kept_share_point_the_right_way() {
        let teacher = ModelMetrics {
            parameters: 300,
            size_on_disk_bytes: 3_000_000,
            accuracy: Some(0.9),
            latency_batch1_ms: Some(6.0),
            latency_batch32_ms: Some(60.0),
            ..ModelMetrics::default()
        };
        let student = ModelMetrics {
            parameters: 100,
            size_on_disk_bytes: 1_500_000,
            accuracy: Some(0.855),
            latency_batch1_ms: Some(3.0),
            latency_batch32_ms: Some(20.0),
            ..ModelMetrics::default()
        };
        let c = Comparison::new(&teacher, &student);
        assert_eq!(c.metric, "accuracy");
        assert!((c.metric_kept.unwrap() - 0.95).abs() < 1e-12);
        assert_eq!(c.parameter_ratio, 3.0);
        assert_eq!(c.size_ratio, 2.0);
        assert_eq!(c.speedup_batch1, Some(2.0));
        assert_eq!(c.speedup_batch32, Some(3.0));
        let md = c.to_markdown("1-distill");
        assert!(md.contains("keeps 95.0% of the teacher's accuracy"), "{md}");
        assert!(
            md.contains("| student | 100 | 1.50 | 3.00 | 20.0 | 0.8550 |"),
            "{md}"
        );
        // Perplexity: lower is better, so a student at 25 keeps 20 / 25 of a teacher at 20.
        let lm = |p| ModelMetrics {
            perplexity: Some(p),
            parameters: 1,
            ..ModelMetrics::default()
        };
        let c = Comparison::new(&lm(20.0), &lm(25.0));
        assert_eq!(c.metric, "perplexity");
        assert!((c.metric_kept.unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(c.speedup_batch1, None);
    }
}
