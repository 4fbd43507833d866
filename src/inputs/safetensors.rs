//! Streaming check of a `.safetensors` file: an 8-byte little-endian header length, a JSON header
//! naming every tensor's dtype, shape and byte range, then the raw tensor bytes.
//!
//! The header is parsed as soon as it has arrived, so a bad header fails the upload early; the
//! byte ranges are checked against the real file length once the last byte is in. Following the
//! format's rules (<https://github.com/huggingface/safetensors#format>), ranges must not overlap
//! and must cover the data section exactly: loaders refuse holes, so we refuse them here rather
//! than an hour into a job.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Checked, Rejection};

/// Largest JSON header accepted; the reference loader uses the same 100 MB cap.
const MAX_HEADER_BYTES: u64 = 100_000_000;
const SLUG: &str = "invalid-safetensors";

/// One tensor as the header describes it; offsets are relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Whether the dtype holds trainable weights (integer buffers such as `position_ids` do not).
    pub fn is_float(&self) -> bool {
        self.dtype.starts_with('F') || self.dtype == "BF16"
    }
}

/// What a valid safetensors file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsSummary {
    pub tensors: Vec<TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

enum Stage {
    /// Collecting the 8-byte header length.
    Length(Vec<u8>),
    /// Collecting the JSON header of the given length.
    Header { len: u64, buf: Vec<u8> },
    /// Header parsed; counting data bytes.
    Data {
        summary: SafetensorsSummary,
        header_len: u64,
    },
}

/// Push-based validator for one safetensors file.
pub struct SafetensorsInspector {
    file: String,
    stage: Stage,
    received: u64,
}

impl SafetensorsInspector {
    /// Starts checking the file called `file` (used in messages).
    pub fn new(file: &str) -> Self {
        Self {
            file: file.to_owned(),
            stage: Stage::Length(Vec::with_capacity(8)),
            received: 0,
        }
    }

    fn reject(&self, message: impl Into<String>) -> Rejection {
        Rejection::in_file(SLUG, &self.file, message)
    }

    /// Feeds the next bytes of the file.
    ///
    /// # Errors
    /// A [`Rejection`] as soon as the header is known to be invalid.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Checked<()> {
        self.received += chunk.len() as u64;
        while !chunk.is_empty() {
            match &mut self.stage {
                Stage::Length(buf) => {
                    let take = (8 - buf.len()).min(chunk.len());
                    buf.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if buf.len() == 8 {
                        let len = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                        if len == 0 || len > MAX_HEADER_BYTES {
                            return Err(self.reject(format!(
                                "header length {len} is not between 1 and {MAX_HEADER_BYTES} bytes"
                            )));
                        }
                        self.stage = Stage::Header {
                            len,
                            buf: Vec::new(),
                        };
                    }
                }
                Stage::Header { len, buf } => {
                    let want = (*len as usize) - buf.len();
                    let take = want.min(chunk.len());
                    buf.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if buf.len() as u64 == *len {
                        let header_len = *len;
                        let summary = parse_header(buf).map_err(|m| self.reject(m))?;
                        self.stage = Stage::Data {
                            summary,
                            header_len,
                        };
                    }
                }
                Stage::Data { .. } => break,
            }
        }
        Ok(())
    }

    /// Checks the byte ranges against the file's real length and returns what it holds.
    ///
    /// # Errors
    /// A [`Rejection`] when the file is empty or truncated, or a range points past its end.
    pub fn finish(self) -> Checked<SafetensorsSummary> {
        let (summary, header_len) = match self.stage {
            Stage::Data {
                summary,
                header_len,
            } => (summary, header_len),
            Stage::Length(_) if self.received == 0 => {
                return Err(Rejection::in_file(SLUG, &self.file, "the file is empty"))
            }
            _ => {
                return Err(Rejection::in_file(
                    SLUG,
                    &self.file,
                    format!(
                        "truncated: the file ends inside its header after {} bytes",
                        self.received
                    ),
                ))
            }
        };
        let data_len = self.received - 8 - header_len;
        let covered = summary.tensors.iter().map(|t| t.end).max().unwrap_or(0);
        if let Some(t) = summary.tensors.iter().find(|t| t.end > data_len) {
            return Err(Rejection::in_file(
                SLUG,
                &self.file,
                format!(
                    "truncated: tensor '{}' needs data bytes {}..{} but the data section has {data_len} bytes",
                    t.name, t.start, t.end
                ),
            ));
        }
        if covered != data_len {
            return Err(Rejection::in_file(
                SLUG,
                &self.file,
                format!(
                    "{} bytes after the last tensor are not described by the header",
                    data_len - covered
                ),
            ));
        }
        Ok(summary)
    }
}

/// Parses the JSON header and checks each entry on its own and the ranges against each other.
fn parse_header(bytes: &[u8]) -> Result<SafetensorsSummary, String> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| format!("header is not a JSON object: {e}"))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| format!("__metadata__ must map strings to strings: {e}"))?;
            continue;
        }
        let entry: RawEntry =
            serde_json::from_value(value).map_err(|e| format!("tensor '{name}': {e}"))?;
        tensors.push(check_entry(name, entry)?);
    }
    check_ranges(&mut tensors)?;
    Ok(SafetensorsSummary { tensors, metadata })
}

/// Checks that one tensor's byte range is exactly the size its dtype and shape need.
fn check_entry(name: String, entry: RawEntry) -> Result<TensorEntry, String> {
    let width = dtype_bytes(&entry.dtype)
        .ok_or_else(|| format!("tensor '{name}' has unknown dtype '{}'", entry.dtype))?;
    let [start, end] = entry.data_offsets;
    if end < start {
        return Err(format!(
            "tensor '{name}' has data_offsets [{start}, {end}] that run backwards"
        ));
    }
    let needed = entry
        .shape
        .iter()
        .try_fold(width, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            format!(
                "tensor '{name}' has a shape {:?} too large to address",
                entry.shape
            )
        })?;
    if needed != end - start {
        return Err(format!(
            "tensor '{name}' ({} {:?}) needs {needed} bytes but its data_offsets [{start}, {end}] span {}",
            entry.dtype,
            entry.shape,
            end - start
        ));
    }
    let shape = entry
        .shape
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| format!("tensor '{name}' dimension {d} is too large"))
        })
        .collect::<Result<_, _>>()?;
    Ok(TensorEntry {
        name,
        dtype: entry.dtype,
        shape,
        start,
        end,
    })
}

/// Sorts tensors by offset and refuses overlaps and holes between them.
fn check_ranges(tensors: &mut [TensorEntry]) -> Result<(), String> {
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut expected_start = 0;
    let mut previous: Option<&TensorEntry> = None;
    for t in tensors.iter() {
        if t.start < expected_start {
            let other = previous.map_or("", |p| p.name.as_str());
            return Err(format!(
                "tensors '{other}' and '{}' overlap (bytes {}..{} and {}..{})",
                t.name,
                previous.map_or(0, |p| p.start),
                expected_start,
                t.start,
                t.end
            ));
        }
        if t.start > expected_start {
            return Err(format!(
                "bytes {expected_start}..{} before tensor '{}' are not described by the header",
                t.start, t.name
            ));
        }
        expected_start = t.end;
        previous = Some(t);
    }
    Ok(())
}

/// Bytes per element of a safetensors dtype; `None` for dtypes this service cannot load.
fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a safetensors file from (name, dtype, shape, [start, end]) and a data length.
    fn file(entries: &[(&str, &str, &[u64], [u64; 2])], data_len: usize) -> Vec<u8> {
        let header: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(n, d, s, o)| {
                (
                    n.to_string(),
                    serde_json::json!({"dtype": d, "shape": s, "data_offsets": o}),
                )
            })
            .collect();
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.resize(out.len() + data_len, 0);
        out
    }

    fn inspect(bytes: &[u8], chunk: usize) -> Checked<SafetensorsSummary> {
        let mut inspector = SafetensorsInspector::new("model.safetensors");
        for piece in bytes.chunks(chunk.max(1)) {
            inspector.feed(piece)?;
        }
        inspector.finish()
    }

    #[test]
    fn accepts_a_valid_file_in_any_chunking() {
        let bytes = file(
            &[("a", "F32", &[2, 3], [0, 24]), ("b", "I64", &[2], [24, 40])],
            40,
        );
        for chunk in [1, 3, 8, 17, bytes.len()] {
            let summary = inspect(&bytes, chunk).unwrap();
            assert_eq!(summary.tensors.len(), 2);
            assert_eq!(summary.tensors[0].shape, vec![2, 3]);
            assert!(summary.tensors[0].is_float() && !summary.tensors[1].is_float());
        }
    }

    #[test]
    fn rejects_empty_and_truncated_files() {
        assert!(inspect(&[], 8).unwrap_err().message.contains("empty"));
        let bytes = file(&[("a", "F32", &[4], [0, 16])], 16);
        let header_cut = inspect(&bytes[..12], 4).unwrap_err();
        assert!(header_cut.message.contains("truncated"), "{header_cut}");
        let data_cut = inspect(&bytes[..bytes.len() - 1], 4).unwrap_err();
        assert!(data_cut.message.contains("truncated"), "{data_cut}");
    }

    #[test]
    fn rejects_offsets_past_the_end_overlaps_and_holes() {
        let past_end = file(&[("a", "F32", &[4], [0, 16])], 8);
        assert!(inspect(&past_end, 64)
            .unwrap_err()
            .message
            .contains("needs data bytes 0..16"));
        let overlap = file(
            &[("a", "F32", &[4], [0, 16]), ("b", "F32", &[4], [8, 24])],
            24,
        );
        assert!(inspect(&overlap, 64)
            .unwrap_err()
            .message
            .contains("overlap"));
        let hole = file(&[("a", "F32", &[1], [4, 8])], 8);
        assert!(inspect(&hole, 64)
            .unwrap_err()
            .message
            .contains("not described"));
        let trailing = file(&[("a", "F32", &[1], [0, 4])], 8);
        assert!(inspect(&trailing, 64)
            .unwrap_err()
            .message
            .contains("after the last tensor"));
    }

    #[test]
    fn rejects_bad_header_contents() {
        let wrong_size = file(&[("a", "F16", &[4], [0, 16])], 16);
        assert!(inspect(&wrong_size, 64)
            .unwrap_err()
            .message
            .contains("needs 8 bytes"));
        let bad_dtype = file(&[("a", "Q4", &[4], [0, 16])], 16);
        assert!(inspect(&bad_dtype, 64)
            .unwrap_err()
            .message
            .contains("unknown dtype"));
        let mut not_json = 4u64.to_le_bytes().to_vec();
        not_json.extend_from_slice(b"nope");
        assert!(inspect(&not_json, 64).unwrap_err().message.contains("JSON"));
        let huge = u64::MAX.to_le_bytes();
        assert!(inspect(&huge, 64)
            .unwrap_err()
            .message
            .contains("header length"));
    }
}
