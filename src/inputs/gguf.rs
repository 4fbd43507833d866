//! Streaming check of a GGUF file: magic, metadata and tensor table parsed with candle's reader,
//! then every tensor's byte range checked against the file's real length.
//!
//! The metadata and tensor table sit at the start of the file but their length is only known by
//! parsing them, so a growing prefix is kept and parsing is retried each time it doubles (1 MiB,
//! 2 MiB, … up to [`MAX_HEADER_BYTES`]); once it parses, the prefix is dropped and the rest of the
//! file is only counted. Memory is bounded by the cap, whatever the file size.

use std::collections::BTreeMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::{Content, Value};

use super::{Checked, Rejection};

/// Largest metadata + tensor table accepted. Real files carry their vocabulary here (SmolLM2's
/// is about 4 MiB); 64 MiB leaves room for large vocabularies while bounding memory.
pub const MAX_HEADER_BYTES: usize = 64 << 20;
const FIRST_ATTEMPT_BYTES: usize = 1 << 20;
const SLUG: &str = "invalid-gguf";

/// One tensor of the table, with its absolute byte range in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    /// ggml type name, e.g. `Q4_1`.
    pub dtype: String,
    /// Dimensions in row-major order (outermost first), as candle reports them.
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

impl GgufTensor {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// What a valid GGUF file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    /// `general.architecture`.
    pub architecture: String,
    /// Integer-valued metadata (hyper-parameters such as `llama.block_count`).
    pub integers: BTreeMap<String, u64>,
    /// Length of `tokenizer.ggml.tokens` when the file embeds a vocabulary.
    pub vocab_tokens: Option<usize>,
    pub tensors: Vec<GgufTensor>,
}

/// Push-based validator for one GGUF file.
pub struct GgufInspector {
    file: String,
    prefix: Vec<u8>,
    next_attempt: usize,
    parsed: Option<(Content, u64)>,
    received: u64,
}

impl GgufInspector {
    /// Starts checking the file called `file` (used in messages).
    pub fn new(file: &str) -> Self {
        Self {
            file: file.to_owned(),
            prefix: Vec::new(),
            next_attempt: FIRST_ATTEMPT_BYTES,
            parsed: None,
            received: 0,
        }
    }

    fn reject(&self, message: impl Into<String>) -> Rejection {
        Rejection::in_file(SLUG, &self.file, message)
    }

    /// Feeds the next bytes of the file.
    ///
    /// # Errors
    /// A [`Rejection`] when the magic is wrong or the header is still unparseable at the cap.
    pub fn feed(&mut self, chunk: &[u8]) -> Checked<()> {
        self.received += chunk.len() as u64;
        if self.parsed.is_some() {
            return Ok(());
        }
        let room = MAX_HEADER_BYTES - self.prefix.len();
        self.prefix
            .extend_from_slice(&chunk[..room.min(chunk.len())]);
        if self.prefix.len() >= 4 && &self.prefix[..4] != b"GGUF" {
            return Err(self.reject("does not start with the GGUF magic bytes"));
        }
        if self.prefix.len() >= self.next_attempt || self.prefix.len() == MAX_HEADER_BYTES {
            match Content::read(&mut Cursor::new(self.prefix.as_slice())) {
                Ok(content) => self.keep(content),
                Err(e) if self.prefix.len() == MAX_HEADER_BYTES => {
                    let why = format!(
                        "metadata and tensor table do not parse within {MAX_HEADER_BYTES} bytes: {}",
                        reason(&e)
                    );
                    return Err(self.reject(why));
                }
                Err(_) => self.next_attempt = self.next_attempt.saturating_mul(2),
            }
        }
        Ok(())
    }

    fn keep(&mut self, content: Content) {
        self.parsed = Some((content, self.received));
        self.prefix = Vec::new();
    }

    /// Parses what is left to parse and checks tensor ranges against the file length.
    ///
    /// # Errors
    /// A [`Rejection`] for an empty, truncated or malformed file.
    pub fn finish(mut self) -> Checked<GgufSummary> {
        if self.received == 0 {
            return Err(self.reject("the file is empty"));
        }
        if self.parsed.is_none() {
            let content = Content::read(&mut Cursor::new(self.prefix.as_slice())).map_err(|e| {
                self.reject(format!(
                    "metadata or tensor table does not parse: {}",
                    reason(&e)
                ))
            })?;
            self.keep(content);
        }
        let (content, _) = self.parsed.take().expect("parsed above");
        summarize(&content, self.received).map_err(|m| self.reject(m))
    }
}

/// What a candle parse error says, without the backtrace candle appends to its text (with file
/// paths of the build machine): the problem body says what, not where.
fn reason(error: &candle_core::Error) -> String {
    let text = error.to_string();
    text.lines()
        .next()
        .unwrap_or("unreadable")
        .trim()
        .to_owned()
}

/// Computes absolute tensor ranges, checks them, and extracts the metadata the service uses.
fn summarize(content: &Content, file_len: u64) -> Result<GgufSummary, String> {
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        // Names come from the file: escaped, so a control character cannot break the one-line
        // problem text.
        let shown = name.escape_debug();
        let elements = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        if elements % block != 0 {
            return Err(format!(
                "tensor '{shown}' has {elements} elements, not a multiple of its block size {block}"
            ));
        }
        let bytes = (elements / block) as u64 * info.ggml_dtype.type_size() as u64;
        let start = content.tensor_data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(bytes));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(format!(
                "tensor '{shown}' has an offset too large to address"
            ));
        };
        if end > file_len {
            return Err(format!(
                "truncated: tensor '{shown}' needs bytes {start}..{end} but the file has {file_len} bytes"
            ));
        }
        tensors.push(GgufTensor {
            name: name.clone(),
            dtype: format!("{:?}", info.ggml_dtype),
            shape: info.shape.dims().to_vec(),
            start,
            end,
        });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    for pair in tensors.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(format!(
                "tensors '{}' and '{}' overlap",
                pair[0].name, pair[1].name
            ));
        }
    }
    let architecture = match content.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err("metadata has no general.architecture string".into()),
    };
    let integers = content
        .metadata
        .iter()
        .filter_map(|(k, v)| as_u64(v).map(|n| (k.clone(), n)))
        .collect();
    let vocab_tokens = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => Some(tokens.len()),
        _ => None,
    };
    Ok(GgufSummary {
        architecture,
        integers,
        vocab_tokens,
        tensors,
    })
}

/// Any non-negative integer metadata value, whatever its stored width.
fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::U8(v) => Some(u64::from(*v)),
        Value::U16(v) => Some(u64::from(*v)),
        Value::U32(v) => Some(u64::from(*v)),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};

    /// A tiny valid GGUF written with candle's own writer.
    fn tiny_gguf() -> Vec<u8> {
        let w = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        let arch = Value::String("llama".into());
        let layers = Value::U32(1);
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(
            &mut out,
            &[
                ("general.architecture", &arch),
                ("llama.block_count", &layers),
            ],
            &[("token_embd.weight", &q)],
        )
        .unwrap();
        out.into_inner()
    }

    fn inspect(bytes: &[u8]) -> Checked<GgufSummary> {
        let mut inspector = GgufInspector::new("m.gguf");
        for piece in bytes.chunks(7) {
            inspector.feed(piece)?;
        }
        inspector.finish()
    }

    #[test]
    fn parses_a_small_file() {
        let summary = inspect(&tiny_gguf()).unwrap();
        assert_eq!(summary.architecture, "llama");
        assert_eq!(summary.integers["llama.block_count"], 1);
        assert_eq!(summary.tensors[0].shape, vec![4, 32]);
        assert_eq!(summary.tensors[0].dtype, "Q8_0");
    }

    #[test]
    fn rejects_empty_truncated_and_foreign_files() {
        assert!(inspect(&[]).unwrap_err().message.contains("empty"));
        let bytes = tiny_gguf();
        // Cut inside the tensor data (the writer may pad after it).
        let end = inspect(&bytes).unwrap().tensors[0].end as usize;
        let cut = inspect(&bytes[..end - 1]).unwrap_err();
        assert!(cut.message.contains("truncated"), "{cut}");
        let header_cut = inspect(&bytes[..40]).unwrap_err();
        assert!(
            header_cut.message.contains("does not parse"),
            "{header_cut}"
        );
        assert!(inspect(b"PK\x03\x04rest")
            .unwrap_err()
            .message
            .contains("magic"));
    }
}
