//! Reading and writing safetensors files entry by entry, without holding a whole file in memory.
//!
//! The writer takes the list of entries with their byte sizes first (safetensors puts all offsets in
//! the header), then the bytes in the same order, so a file can be produced one tensor at a time.
//! The reader memory-maps the file and hands out each entry's bytes; [`SafetensorsFile::release`]
//! drops an entry's pages once used, so streaming through a large file keeps resident memory at
//! about one tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// One safetensors entry: name, dtype name, shape and byte length.
#[derive(Clone, Debug, PartialEq)]
pub struct EntryPlan {
    /// Tensor name in the file.
    pub name: String,
    /// safetensors dtype name (`F32`, `F16`, `I8`, `U8`, ...).
    pub dtype: String,
    /// Shape in the file.
    pub shape: Vec<usize>,
    /// Byte length of the data.
    pub bytes: usize,
}

/// Writes a safetensors file whose entries are announced up front and whose data follows in order.
pub struct SafetensorsWriter {
    out: BufWriter<File>,
    plan: Vec<EntryPlan>,
    next: usize,
    path: PathBuf,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `plan` with `metadata`.
    ///
    /// # Errors
    /// Fails when the file cannot be written or two entries share a name.
    pub fn create(
        path: &Path,
        plan: Vec<EntryPlan>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).unwrap_or_default(),
            );
        }
        let mut offset = 0usize;
        for entry in &plan {
            let info = serde_json::json!({
                "dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset, offset + entry.bytes]
            });
            if header.insert(entry.name.clone(), info).is_some() {
                return Err(EngineError::InvalidModel(format!(
                    "tensor {} is written twice",
                    entry.name
                )));
            }
            offset += entry.bytes;
        }
        let mut json = serde_json::to_vec(&header).map_err(|e| EngineError::json(path, e))?;
        // Data starts 8-byte aligned, as the safetensors writer does.
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let file = File::create(path).map_err(|e| EngineError::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(|e| EngineError::io(path, e))?;
        out.write_all(&json).map_err(|e| EngineError::io(path, e))?;
        Ok(Self {
            out,
            plan,
            next: 0,
            path: path.to_path_buf(),
        })
    }

    /// Writes the data of the next planned entry.
    ///
    /// # Errors
    /// Fails on a write error or when `bytes` does not have the planned length.
    pub fn write_next(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(entry) = self.plan.get(self.next) else {
            return Err(EngineError::InvalidModel(
                "more tensor data than planned".into(),
            ));
        };
        if entry.bytes != bytes.len() {
            return Err(EngineError::InvalidModel(format!(
                "{}: planned {} bytes, got {}",
                entry.name,
                entry.bytes,
                bytes.len()
            )));
        }
        self.out
            .write_all(bytes)
            .map_err(|e| EngineError::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes the file after checking every planned entry was written.
    ///
    /// # Errors
    /// Fails on a write error or a missing entry.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(EngineError::InvalidModel(format!(
                "{} planned tensors were not written",
                self.plan.len() - self.next
            )));
        }
        self.out.flush().map_err(|e| EngineError::io(&self.path, e))
    }
}

/// One entry of a safetensors header.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RawEntry {
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Start and end of the data, relative to the end of the header.
    pub data_offsets: [usize; 2],
}

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    mmap: memmap2::Mmap,
    data_start: usize,
    entries: BTreeMap<String, RawEntry>,
    metadata: BTreeMap<String, String>,
    path: PathBuf,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header.
    ///
    /// # Errors
    /// Fails when the file cannot be read or is not a well-formed safetensors file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; like every safetensors loader we
        // rely on the file not being truncated or rewritten while it is mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let bad = |why: &str| EngineError::InvalidModel(format!("{}: {why}", path.display()));
        let header_len = mmap
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        let header_len =
            header_len.ok_or_else(|| bad("shorter than a safetensors header"))? as usize;
        let data_start = header_len
            .checked_add(8)
            .filter(|&s| s <= mmap.len())
            .ok_or_else(|| bad("header past the end"))?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..data_start]).map_err(|e| EngineError::json(path, e))?;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value).map_err(|e| EngineError::json(path, e))?;
                continue;
            }
            let entry: RawEntry =
                serde_json::from_value(value).map_err(|e| EngineError::json(path, e))?;
            let [start, end] = entry.data_offsets;
            if start > end || data_start + end > mmap.len() {
                return Err(bad(&format!("tensor {name} lies outside the file")));
            }
            entries.insert(name, entry);
        }
        Ok(Self {
            mmap,
            data_start,
            entries,
            metadata,
            path: path.to_path_buf(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries by name.
    pub fn entries(&self) -> &BTreeMap<String, RawEntry> {
        &self.entries
    }

    /// Entries in the order their data lies in the file (sequential reads for streaming).
    pub fn entries_in_file_order(&self) -> Vec<(&String, &RawEntry)> {
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_by_key(|(_, e)| e.data_offsets[0]);
        entries
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The data bytes of an entry.
    pub fn bytes(&self, entry: &RawEntry) -> &[u8] {
        &self.mmap[self.data_start + entry.data_offsets[0]..self.data_start + entry.data_offsets[1]]
    }

    /// An entry's values as f32: borrowed from the map when the entry is aligned F32 data, converted
    /// otherwise (F16, BF16, unaligned F32).
    ///
    /// # Errors
    /// Fails for a dtype that is not a float.
    pub fn f32_values(&self, name: &str, entry: &RawEntry) -> Result<std::borrow::Cow<'_, [f32]>> {
        let bytes = self.bytes(entry);
        let values = match entry.dtype.as_str() {
            "F32" => {
                // SAFETY: every bit pattern is a valid f32; `align_to` only yields the aligned middle.
                let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
                if head.is_empty() && tail.is_empty() {
                    return Ok(std::borrow::Cow::Borrowed(mid));
                }
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            }
            "F16" => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            "BF16" => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(EngineError::InvalidModel(format!(
                    "{name}: dtype {other} is not a float"
                )));
            }
        };
        Ok(std::borrow::Cow::Owned(values))
    }

    /// Tells the kernel an entry's pages are no longer needed, so streaming through a file larger
    /// than memory does not accumulate resident pages. Best effort: errors are ignored.
    pub fn release(&self, entry: &RawEntry) {
        let page = 4096;
        let start = (self.data_start + entry.data_offsets[0]) / page * page;
        let end = self.data_start + entry.data_offsets[1];
        // SAFETY: the map is read-only and file-backed, so dropped pages are re-read from the file on
        // the next access; no data is lost and no reference observes a change.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }

    /// A dense entry as a candle tensor on `device`.
    ///
    /// # Errors
    /// Fails for an unknown name or a dtype candle does not have.
    pub fn tensor(&self, name: &str, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        use candle_core::DType;
        let entry = self.entries.get(name).ok_or_else(|| {
            EngineError::InvalidModel(format!("{}: no tensor {name}", self.path.display()))
        })?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => {
                return Err(EngineError::Unsupported(format!(
                    "{name}: dtype {other} has no candle tensor type"
                )))
            }
        };
        Ok(candle_core::Tensor::from_raw_buffer(
            self.bytes(entry),
            dtype,
            &entry.shape,
            device,
        )?)
    }
}
