//! Streaming validation of a dataset: JSONL or CSV rows with a text and a label field for
//! classification, or plain text (one example per non-empty line) for language modelling.
//!
//! Every row must be UTF-8 and carry the named fields; the summary counts rows, labels and
//! splits. A `split` field is honoured; without one a row goes to `test` when the first byte of
//! sha256(text) is divisible by 5 (about 20%), which is deterministic and the same rule the
//! shared datasets were split with. With `strict = false`, bad rows are skipped and the first
//! few are reported with their line numbers instead of refusing the file.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::csv_rows::{CsvRows, Record};
use super::lines::{Line, LineSplitter};
use super::{Checked, Rejection};

/// How many rejected rows a summary lists (all are counted).
pub const MAX_REJECTED_EXAMPLES: usize = 10;
/// Longest row accepted; longer ones are rejected rather than buffered.
pub const MAX_ROW_BYTES: usize = 16 << 20;
const SLUG: &str = "invalid-dataset";

/// File format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Jsonl,
    Csv,
    Text,
}

impl DatasetFormat {
    /// The name used in requests and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
            Self::Text => "text",
        }
    }

    /// Infers the format from a file name's extension.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "txt" | "text" => Some(Self::Text),
            _ => None,
        }
    }
}

impl FromStr for DatasetFormat {
    type Err = Rejection;
    fn from_str(s: &str) -> Checked<Self> {
        match s {
            "jsonl" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            "text" => Ok(Self::Text),
            other => Err(Rejection::new(
                "invalid-format",
                format!("format '{other}' is not one of jsonl, csv, text"),
            )),
        }
    }
}

/// How to read a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetOptions {
    pub format: DatasetFormat,
    pub text_field: String,
    pub label_field: String,
    /// Refuse the whole file at the first bad row (`true`), or skip and report bad rows.
    pub strict: bool,
}

impl DatasetOptions {
    /// Defaults for a format: fields `text` and `label`, strict.
    pub fn new(format: DatasetFormat) -> Self {
        Self {
            format,
            text_field: "text".into(),
            label_field: "label".into(),
            strict: true,
        }
    }
}

/// A skipped row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedRow {
    pub line: u64,
    pub reason: String,
}

/// What a valid dataset holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub format: DatasetFormat,
    pub rows: u64,
    /// Rows per label; empty for plain text.
    pub label_counts: BTreeMap<String, u64>,
    /// Rows per split (`train`, `test`, or whatever `split` fields say).
    pub splits: BTreeMap<String, u64>,
    /// Rows skipped because `strict` was off.
    pub rejected: u64,
    /// The first [`MAX_REJECTED_EXAMPLES`] skipped rows.
    pub rejected_rows: Vec<RejectedRow>,
    pub bytes: u64,
    pub sha256: String,
}

/// One good row: its label (none for plain text) and the split it belongs to.
struct Row {
    label: Option<String>,
    split: String,
}

impl Row {
    /// A row whose split is the given one, else the text's hash split.
    fn new(text: &str, label: Option<String>, split: Option<String>) -> Self {
        Self {
            label,
            split: split.unwrap_or_else(|| hash_split(text).to_owned()),
        }
    }
}

/// Counts accepted rows and collects rejected ones.
struct Tally {
    strict: bool,
    rows: u64,
    labels: BTreeMap<String, u64>,
    splits: BTreeMap<String, u64>,
    rejected: u64,
    examples: Vec<RejectedRow>,
}

impl Tally {
    fn record(&mut self, line: u64, row: Result<Option<Row>, String>) -> Checked<()> {
        match row {
            Ok(None) => Ok(()),
            Ok(Some(row)) => {
                self.rows += 1;
                if let Some(label) = row.label {
                    *self.labels.entry(label).or_default() += 1;
                }
                *self.splits.entry(row.split).or_default() += 1;
                Ok(())
            }
            Err(reason) if self.strict => {
                Err(Rejection::new(SLUG, format!("line {line}: {reason}")))
            }
            Err(reason) => {
                self.rejected += 1;
                if self.examples.len() < MAX_REJECTED_EXAMPLES {
                    self.examples.push(RejectedRow { line, reason });
                }
                Ok(())
            }
        }
    }
}

/// The split a row without a `split` field goes to.
pub fn hash_split(text: &str) -> &'static str {
    if Sha256::digest(text.as_bytes())[0] % 5 == 0 {
        "test"
    } else {
        "train"
    }
}

// One parser per inspector, made once and never moved in a loop: boxing the CSV state buys nothing.
#[allow(clippy::large_enum_variant)]
enum Parser {
    Lines(LineSplitter),
    Csv {
        rows: CsvRows,
        columns: Option<Columns>,
    },
}

/// Positions of the fields used, from the CSV header.
#[derive(Clone, Copy)]
struct Columns {
    text: usize,
    label: usize,
    split: Option<usize>,
    count: usize,
}

/// Push-based dataset validator.
pub struct DatasetInspector {
    options: DatasetOptions,
    parser: Parser,
    tally: Tally,
    hasher: Sha256,
    bytes: u64,
}

impl DatasetInspector {
    /// Starts reading a dataset with the given options.
    pub fn new(options: DatasetOptions) -> Self {
        let parser = match options.format {
            DatasetFormat::Csv => Parser::Csv {
                rows: CsvRows::new(MAX_ROW_BYTES),
                columns: None,
            },
            _ => Parser::Lines(LineSplitter::new(MAX_ROW_BYTES)),
        };
        let tally = Tally {
            strict: options.strict,
            rows: 0,
            labels: BTreeMap::new(),
            splits: BTreeMap::new(),
            rejected: 0,
            examples: Vec::new(),
        };
        Self {
            options,
            parser,
            tally,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Feeds the next bytes.
    ///
    /// # Errors
    /// A [`Rejection`] at the first bad row when strict, or for a CSV header lacking a field.
    pub fn feed(&mut self, chunk: &[u8]) -> Checked<()> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        let (options, tally) = (&self.options, &mut self.tally);
        match &mut self.parser {
            Parser::Lines(lines) => lines.feed(chunk, |line| on_line(options, tally, line)),
            Parser::Csv { rows, columns } => {
                rows.feed(chunk, |record| on_record(options, tally, columns, record))
            }
        }
    }

    /// Reads the last row and summarises the dataset.
    ///
    /// # Errors
    /// A [`Rejection`] for an empty file, zero usable rows, or fewer than two labels.
    pub fn finish(self) -> Checked<DatasetSummary> {
        let Self {
            options,
            parser,
            mut tally,
            hasher,
            bytes,
        } = self;
        match parser {
            Parser::Lines(lines) => lines.finish(|line| on_line(&options, &mut tally, line))?,
            Parser::Csv { rows, mut columns } => {
                rows.finish(|record| on_record(&options, &mut tally, &mut columns, record))?
            }
        }
        if bytes == 0 {
            return Err(Rejection::new(SLUG, "the file is empty"));
        }
        if tally.rows == 0 {
            let first = tally
                .examples
                .first()
                .map(|r| format!("; line {}: {}", r.line, r.reason));
            return Err(Rejection::new(
                SLUG,
                format!(
                    "the dataset has no usable rows{}",
                    first.unwrap_or_default()
                ),
            ));
        }
        if options.format != DatasetFormat::Text && tally.labels.len() < 2 {
            let only = tally.labels.keys().next().cloned().unwrap_or_default();
            return Err(Rejection::new(
                SLUG,
                // Quoted with escapes: a label is user text and may hold newlines (a quoted CSV
                // field), and a problem's detail is one line.
                format!("every row has the label {only:?}; a classifier needs at least two labels"),
            ));
        }
        Ok(DatasetSummary {
            format: options.format,
            rows: tally.rows,
            label_counts: tally.labels,
            splits: tally.splits,
            rejected: tally.rejected,
            rejected_rows: tally.examples,
            bytes,
            sha256: hex::encode(hasher.finalize()),
        })
    }
}

fn on_line(options: &DatasetOptions, tally: &mut Tally, (line, bytes): Line<'_>) -> Checked<()> {
    let row = match bytes {
        None => Err(format!("the line is longer than {MAX_ROW_BYTES} bytes")),
        Some(bytes) => utf8(bytes).and_then(|text| match options.format {
            DatasetFormat::Jsonl => json_row(options, text),
            _ if text.trim().is_empty() => Ok(None),
            _ => Ok(Some(Row::new(text, None, None))),
        }),
    };
    tally.record(line, row)
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))
}

fn json_row(options: &DatasetOptions, line: &str) -> Result<Option<Row>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(mut object) = value else {
        return Err("not a JSON object".into());
    };
    let text = match object.remove(&options.text_field) {
        Some(Value::String(text)) if !text.is_empty() => text,
        Some(Value::String(_)) => return Err(format!("field `{}` is empty", options.text_field)),
        Some(_) => return Err(format!("field `{}` is not a string", options.text_field)),
        None => return Err(format!("field `{}` is missing", options.text_field)),
    };
    let label = match object.get(&options.label_field) {
        Some(Value::String(s)) => s.clone(),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
        Some(_) => {
            return Err(format!(
                "field `{}` is not a string or number",
                options.label_field
            ))
        }
        None => return Err(format!("field `{}` is missing", options.label_field)),
    };
    let split = match object.get("split") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return Err("field `split` is not a non-empty string".into()),
    };
    Ok(Some(Row::new(&text, Some(label), split)))
}

fn on_record(
    options: &DatasetOptions,
    tally: &mut Tally,
    columns: &mut Option<Columns>,
    (line, fields): Record<'_>,
) -> Checked<()> {
    let Some(fields) = fields else {
        return tally.record(
            line,
            Err(format!("the record is longer than {MAX_ROW_BYTES} bytes")),
        );
    };
    let Some(cols) = *columns else {
        *columns = Some(header_columns(options, &fields)?);
        return Ok(());
    };
    let row = csv_row(cols, &fields);
    tally.record(line, row)
}

fn header_columns(options: &DatasetOptions, fields: &[&[u8]]) -> Checked<Columns> {
    let names: Vec<&str> = fields
        .iter()
        .map(|f| std::str::from_utf8(f).map(|s| s.trim_start_matches('\u{feff}').trim()))
        .collect::<Result<_, _>>()
        .map_err(|_| Rejection::new(SLUG, "line 1: the CSV header is not valid UTF-8"))?;
    let find = |name: &str| names.iter().position(|n| *n == name);
    let missing = |name: &str| {
        Rejection::new(
            SLUG,
            format!(
                "line 1: the CSV header has no column `{name}` (columns: {})",
                // Quoted and escaped: a column name may hold anything, line breaks included.
                names
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    };
    Ok(Columns {
        text: find(&options.text_field).ok_or_else(|| missing(&options.text_field))?,
        label: find(&options.label_field).ok_or_else(|| missing(&options.label_field))?,
        split: find("split"),
        count: names.len(),
    })
}

fn csv_row(cols: Columns, fields: &[&[u8]]) -> Result<Option<Row>, String> {
    if fields.len() == 1 && fields[0].is_empty() {
        return Ok(None);
    }
    if fields.len() != cols.count {
        return Err(format!(
            "has {} fields but the header has {}",
            fields.len(),
            cols.count
        ));
    }
    let text = utf8(fields[cols.text])?;
    if text.is_empty() {
        return Err("the text field is empty".into());
    }
    let label = utf8(fields[cols.label])?.to_owned();
    let split = match cols.split.map(|i| utf8(fields[i])).transpose()? {
        Some("") | None => None,
        Some(s) => Some(s.to_owned()),
    };
    Ok(Some(Row::new(text, Some(label), split)))
}

#[cfg(test)]
#[path = "dataset_tests.rs"]
mod tests;
