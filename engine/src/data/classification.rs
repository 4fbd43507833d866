//! Text classification datasets from JSONL or CSV files.
//!
//! Each row has a text and a label (field names configurable) and optionally a split. Labels are
//! mapped to ids in sorted order (numerically when every label is a number), and the mapping is
//! saved with the model so predictions can be named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::split::{carve_validation, hashed_split, Split, SplitSummary};
use crate::data::{Example, TextEncoder};
use crate::{EngineError, Result};

/// How to read a classification file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassificationSpec {
    /// Field holding the text.
    pub text_field: String,
    /// Field holding the label (string, number or boolean).
    pub label_field: String,
    /// Field holding the split; rows without it are split by hash.
    pub split_field: String,
    /// Share of train carved out as validation when no row says `validation`.
    pub validation_fraction: f64,
    /// Keep at most this many training rows (in file order).
    pub max_train_samples: Option<usize>,
    /// Keep at most this many validation and test rows each (in file order).
    pub max_eval_samples: Option<usize>,
}

impl Default for ClassificationSpec {
    fn default() -> Self {
        Self {
            text_field: "text".into(),
            label_field: "label".into(),
            split_field: "split".into(),
            validation_fraction: 0.1,
            max_train_samples: None,
            max_eval_samples: None,
        }
    }
}

/// Class names by id, sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelMap {
    /// `id2label[i]` is the name of class `i`.
    pub id2label: Vec<String>,
}

impl LabelMap {
    /// Builds the sorted mapping; numbers sort numerically when every label is an integer.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a str>) -> Self {
        let unique: BTreeSet<&str> = labels.into_iter().collect();
        let mut id2label: Vec<String> = unique.into_iter().map(str::to_owned).collect();
        if id2label.iter().all(|l| l.parse::<i64>().is_ok()) {
            id2label.sort_by_key(|l| l.parse::<i64>().unwrap_or_default());
        }
        Self { id2label }
    }

    /// The id of a class name.
    pub fn id(&self, label: &str) -> Option<u32> {
        self.id2label
            .iter()
            .position(|l| l == label)
            .map(|i| i as u32)
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.id2label.len()
    }

    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.id2label.is_empty()
    }

    /// `label2id` as Hugging Face's config.json stores it.
    pub fn label2id(&self) -> BTreeMap<String, u32> {
        self.id2label
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i as u32))
            .collect()
    }

    /// Writes `{"id2label": {...}, "label2id": {...}}` to `path`.
    ///
    /// # Errors
    /// An I/O failure.
    pub fn save(&self, path: &Path) -> Result<()> {
        let id2label: BTreeMap<String, &str> = self
            .id2label
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.as_str()))
            .collect();
        let doc = serde_json::json!({ "id2label": id2label, "label2id": self.label2id() });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| EngineError::json(path, e))?;
        std::fs::write(path, text).map_err(|e| EngineError::io(path, e))
    }
}

/// A tokenized classification dataset.
#[derive(Clone, Debug)]
pub struct ClassificationData {
    /// Class names.
    pub labels: LabelMap,
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples (for early stopping).
    pub validation: Vec<Example>,
    /// Test examples (for the final report).
    pub test: Vec<Example>,
    /// Split sizes and how validation was made.
    pub summary: SplitSummary,
}

/// One parsed row before tokenization.
struct Row {
    text: String,
    label: String,
    split: Split,
}

impl ClassificationData {
    /// Reads, splits and tokenizes a `.jsonl`/`.json` (one object per line) or `.csv` file.
    ///
    /// # Errors
    /// [`EngineError::Data`] with the line number for a malformed row, an I/O or tokenizer error,
    /// or a file with fewer than two classes.
    pub fn load(path: &Path, spec: &ClassificationSpec, encoder: &TextEncoder) -> Result<Self> {
        if !(0.0..1.0).contains(&spec.validation_fraction) {
            return Err(EngineError::InvalidSetting(
                "validation_fraction must be in [0, 1)".into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let is_csv = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let rows = if is_csv {
            parse_csv(path, &text, spec)?
        } else {
            parse_jsonl(path, &text, spec)?
        };
        Self::from_rows(path, rows, spec, encoder)
    }

    fn from_rows(
        path: &Path,
        mut rows: Vec<Row>,
        spec: &ClassificationSpec,
        encoder: &TextEncoder,
    ) -> Result<Self> {
        let labels = LabelMap::from_labels(rows.iter().map(|r| r.label.as_str()));
        if labels.len() < 2 {
            return Err(data_error(
                path,
                0,
                format!("need at least two classes, found {}", labels.len()),
            ));
        }
        let carve =
            !rows.iter().any(|r| r.split == Split::Validation) && spec.validation_fraction > 0.0;
        if carve {
            for row in rows.iter_mut().filter(|r| r.split == Split::Train) {
                if carve_validation(&row.text, spec.validation_fraction) {
                    row.split = Split::Validation;
                }
            }
        }
        let encode = |split: Split, cap: Option<usize>| -> Result<Vec<Example>> {
            let chosen: Vec<&Row> = rows
                .iter()
                .filter(|r| r.split == split)
                .take(cap.unwrap_or(usize::MAX))
                .collect();
            let texts: Vec<&str> = chosen.iter().map(|r| r.text.as_str()).collect();
            let ids = encoder.encode_all(&texts)?;
            Ok(ids
                .into_iter()
                .zip(&chosen)
                .map(|(input_ids, r)| Example {
                    input_ids,
                    label: labels.id(&r.label),
                })
                .collect())
        };
        let train = encode(Split::Train, spec.max_train_samples)?;
        let validation = encode(Split::Validation, spec.max_eval_samples)?;
        let test = encode(Split::Test, spec.max_eval_samples)?;
        let summary = SplitSummary {
            train: train.len(),
            validation: validation.len(),
            test: test.len(),
            validation_carved_from_train: carve,
        };
        Ok(Self {
            labels,
            train,
            validation,
            test,
            summary,
        })
    }
}

fn data_error(path: &Path, line: usize, message: impl Into<String>) -> EngineError {
    EngineError::Data {
        path: PathBuf::from(path),
        line,
        message: message.into(),
    }
}

/// A JSON scalar as a label string (`"spam"`, `3`, `true`).
fn label_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_jsonl(path: &Path, text: &str, spec: &ClassificationSpec) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| data_error(path, line_no, format!("invalid JSON: {e}")))?;
        let field = |name: &str| value.get(name);
        let text = field(&spec.text_field)
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                data_error(
                    path,
                    line_no,
                    format!("missing string field `{}`", spec.text_field),
                )
            })?;
        let label = field(&spec.label_field)
            .and_then(label_string)
            .ok_or_else(|| {
                data_error(
                    path,
                    line_no,
                    format!("missing label field `{}`", spec.label_field),
                )
            })?;
        let split = split_of(field(&spec.split_field).and_then(|v| v.as_str()), text)
            .map_err(|m| data_error(path, line_no, m))?;
        rows.push(Row {
            text: text.to_owned(),
            label,
            split,
        });
    }
    Ok(rows)
}

fn parse_csv(path: &Path, text: &str, spec: &ClassificationSpec) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| data_error(path, 1, format!("invalid CSV header: {e}")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let text_col = column(&spec.text_field).ok_or_else(|| {
        data_error(
            path,
            1,
            format!("no column `{}` in the header", spec.text_field),
        )
    })?;
    let label_col = column(&spec.label_field).ok_or_else(|| {
        data_error(
            path,
            1,
            format!("no column `{}` in the header", spec.label_field),
        )
    })?;
    let split_col = column(&spec.split_field);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            data_error(path, line, format!("invalid CSV row: {e}"))
        })?;
        let line_no = record.position().map_or(0, |p| p.line() as usize);
        let text = record.get(text_col).unwrap_or_default();
        let label = record.get(label_col).unwrap_or_default().trim();
        if label.is_empty() {
            return Err(data_error(
                path,
                line_no,
                format!("empty label `{}`", spec.label_field),
            ));
        }
        let split = split_of(
            split_col
                .and_then(|c| record.get(c))
                .filter(|s| !s.is_empty()),
            text,
        )
        .map_err(|m| data_error(path, line_no, m))?;
        rows.push(Row {
            text: text.to_owned(),
            label: label.to_owned(),
            split,
        });
    }
    Ok(rows)
}

fn split_of(field: Option<&str>, text: &str) -> std::result::Result<Split, String> {
    match field {
        Some(value) => Split::parse(value).ok_or_else(|| format!("unknown split `{value}`")),
        None => Ok(hashed_split(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenize::tests::tiny_tokenizer;

    fn encoder() -> TextEncoder {
        TextEncoder::new(tiny_tokenizer(), 8, None).unwrap()
    }

    #[test]
    fn jsonl_with_splits_and_custom_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let rows = [
            r#"{"sentence": "good movie", "y": "pos", "part": "train"}"#,
            r#"{"sentence": "bad movie", "y": "neg", "part": "train"}"#,
            "",
            r#"{"sentence": "great film", "y": "pos", "part": "validation"}"#,
            r#"{"sentence": "awful film", "y": "neg", "part": "test"}"#,
        ];
        std::fs::write(&path, rows.join("\n")).unwrap();
        let spec = ClassificationSpec {
            text_field: "sentence".into(),
            label_field: "y".into(),
            split_field: "part".into(),
            ..Default::default()
        };
        let data = ClassificationData::load(&path, &spec, &encoder()).unwrap();
        assert_eq!(data.labels.id2label, vec!["neg", "pos"]);
        assert_eq!(
            (data.train.len(), data.validation.len(), data.test.len()),
            (2, 1, 1)
        );
        assert!(!data.summary.validation_carved_from_train);
        assert_eq!(
            data.train[0],
            Example {
                input_ids: vec![2, 4, 6, 3],
                label: Some(1)
            }
        );
        assert_eq!(data.test[0].label, Some(0));
    }

    #[test]
    fn errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(
            &path,
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n",
        )
        .unwrap();
        let err = ClassificationData::load(&path, &ClassificationSpec::default(), &encoder())
            .unwrap_err();
        assert!(matches!(err, EngineError::Data { line: 2, .. }), "{err}");
        std::fs::write(&path, "{\"text\": \"a\", \"label\": 1}\nnot json\n").unwrap();
        let err = ClassificationData::load(&path, &ClassificationSpec::default(), &encoder())
            .unwrap_err();
        assert!(err.to_string().contains(":2:"), "{err}");
    }

    #[test]
    fn csv_with_quotes_numeric_labels_hash_split_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        let mut body = String::from("label,text\n");
        for i in 0..60 {
            body.push_str(&format!(
                "{},\"the film, number {i}\"\n",
                if i % 2 == 0 { 10 } else { 9 }
            ));
        }
        std::fs::write(&path, &body).unwrap();
        let spec = ClassificationSpec {
            max_train_samples: Some(5),
            validation_fraction: 0.2,
            ..Default::default()
        };
        let data = ClassificationData::load(&path, &spec, &encoder()).unwrap();
        assert_eq!(
            data.labels.id2label,
            vec!["9", "10"],
            "numeric labels sort numerically"
        );
        assert_eq!(data.train.len(), 5);
        assert!(data.summary.validation_carved_from_train);
        assert!(
            data.summary.test > 0 && data.summary.validation > 0,
            "{:?}",
            data.summary
        );
        std::fs::write(&path, "label,text\n1,a\n2\n").unwrap();
        let err = ClassificationData::load(&path, &spec, &encoder()).unwrap_err();
        assert!(matches!(err, EngineError::Data { line: 3, .. }), "{err}");
    }

    #[test]
    fn label_map_saves_both_directions() {
        let map = LabelMap::from_labels(["spam", "ham", "spam"]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.json");
        map.save(&path).unwrap();
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(saved["id2label"]["0"], "ham");
        assert_eq!(saved["label2id"]["spam"], 1);
    }
}
